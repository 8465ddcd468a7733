-- paystream: no transaction
-- Issue 25, storage that stays bounded.  What 017 needs, made without blocking webhooks:
-- each statement below commits on its own, and none holds a lock that stops inserts for
-- longer than a moment (the ADD CONSTRAINT waits at most 5 s for its lock; run migrate
-- again if it could not get it).
--
-- The tables pruned row by row (ops/retention.py) get an index on the time they are
-- pruned by, first.
--
-- stripe_events becomes partitioned by received_at in 017, its key (id, received_at).
-- The existing table becomes its first partition as it is: its unique index on that key
-- is built here CONCURRENTLY, and a CHECK on its range is added NOT VALID and then
-- validated, a scan that lets inserts go on.  017 then attaches it without reading it.
-- The range ends a week ahead, so that webhooks arriving until 017 runs (and for the rest
-- of that week: the old table is the partition up to then) still fit; rows after it go to
-- the partitions retention makes.  A table still empty (a new database) gets no range:
-- 017 drops it.
-- statement
DROP INDEX CONCURRENTLY IF EXISTS outbound_deliveries_delivered_idx
-- statement
CREATE INDEX CONCURRENTLY outbound_deliveries_delivered_idx ON outbound_deliveries (delivered_at)
  WHERE delivered_at IS NOT NULL
-- statement
DROP INDEX CONCURRENTLY IF EXISTS outbox_done_idx
-- statement
CREATE INDEX CONCURRENTLY outbox_done_idx ON outbox (done_at) WHERE done_at IS NOT NULL
-- statement
DROP INDEX CONCURRENTLY IF EXISTS idempotency_keys_created_idx
-- statement
CREATE INDEX CONCURRENTLY idempotency_keys_created_idx ON idempotency_keys (created_at)
-- statement
DROP INDEX CONCURRENTLY IF EXISTS stripe_events_id_received_key
-- statement
CREATE UNIQUE INDEX CONCURRENTLY stripe_events_id_received_key ON stripe_events (id, received_at)
-- statement
DO $$
DECLARE
  cutoff timestamptz := date_trunc('day', clock_timestamp()) + interval '8 days';
BEGIN
  PERFORM set_config('lock_timeout', '5s', true);
  IF EXISTS (SELECT FROM stripe_events)
     AND NOT EXISTS (SELECT FROM pg_constraint WHERE conname = 'stripe_events_before_partitions') THEN
    EXECUTE format('ALTER TABLE stripe_events ADD CONSTRAINT stripe_events_before_partitions
                      CHECK (received_at < %L) NOT VALID', cutoff);
    INSERT INTO paystream_config (key, value) VALUES ('stripe_events_cutoff', to_jsonb(cutoff))
      ON CONFLICT (key) DO UPDATE SET value = excluded.value, recorded_at = clock_timestamp();
  END IF;
END $$
-- statement
DO $$
BEGIN
  IF EXISTS (SELECT FROM pg_constraint WHERE conname = 'stripe_events_before_partitions') THEN
    ALTER TABLE stripe_events VALIDATE CONSTRAINT stripe_events_before_partitions;
  END IF;
END $$
