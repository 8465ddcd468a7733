-- Issue 25, storage that stays bounded: stripe_events partitioned by received_at, so that
-- retention drops whole partitions of processed events (ops/retention.py) and never
-- deletes a row of them.  One transaction, holding the table for a moment: no row is read
-- here (016 built the key's index and validated the existing table's range).
--
-- A partitioned table's unique keys must hold the partition key, so the key is
-- (id, received_at), and "one row per evt_ id" is kept by paystream_store_event, which
-- every delivery goes through: it takes a transaction-scoped advisory lock on the id
-- (pooler-safe), then finds the row by id in any partition, then inserts or counts a
-- repeat.  Concurrent deliveries of one event queue on that lock until the first commits,
-- as they queued on the primary key's row before.
--
-- Nodes still running the code before this migration answer Stripe 500 until they are
-- restarted (their INSERT ... ON CONFLICT (id) has no key to conflict on); Stripe retries.
SET LOCAL lock_timeout = '10s';

ALTER TABLE parked_events DROP CONSTRAINT IF EXISTS parked_events_stripe_event_id_fkey;
ALTER TABLE stripe_events RENAME TO stripe_events_legacy;
ALTER INDEX stripe_events_object_idx RENAME TO stripe_events_legacy_object_idx;
ALTER INDEX stripe_events_unprocessed_idx RENAME TO stripe_events_legacy_unprocessed_idx;
ALTER TABLE stripe_events_legacy DROP CONSTRAINT stripe_events_pkey;
ALTER TABLE stripe_events_legacy
  ADD CONSTRAINT stripe_events_legacy_pkey PRIMARY KEY USING INDEX stripe_events_id_received_key;
ALTER TABLE stripe_events_legacy ADD COLUMN first_received_at timestamptz;  -- no default: no rewrite

CREATE TABLE stripe_events (
  id             text NOT NULL CONSTRAINT stripe_events_id_check CHECK (id ~ '^evt_'),
  type           text NOT NULL,
  object_id      text,
  api_version    text,
  livemode       boolean,
  created        timestamptz,           -- Stripe's event.created
  raw_body       text NOT NULL,         -- exactly the bytes Stripe signed
  headers        jsonb NOT NULL,
  received_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
  processed_at   timestamptz,           -- NULL: stored, not (yet) applied
  -- No foreign key to transactions here: attaching a partition would then lock
  -- transactions against writes (the key is cloned onto it), every day, under load.
  -- The converted table keeps the one it had.
  transaction_id text,
  outcome        text,
  error          text,
  attempts       integer NOT NULL DEFAULT 1,
  -- Set when retention moved an event not processed yet out of a partition it was about to
  -- drop (received_at then says when it was moved): when it first came.
  first_received_at timestamptz,
  CONSTRAINT stripe_events_pkey PRIMARY KEY (id, received_at)
) PARTITION BY RANGE (received_at);
CREATE INDEX stripe_events_object_idx ON stripe_events (object_id);
CREATE INDEX stripe_events_unprocessed_idx ON stripe_events (received_at) WHERE processed_at IS NULL;

DO $$
DECLARE
  cutoff timestamptz;
BEGIN
  IF NOT EXISTS (SELECT FROM stripe_events_legacy) THEN
    DROP TABLE stripe_events_legacy;
  ELSE
    SELECT (value #>> '{}')::timestamptz INTO cutoff FROM paystream_config WHERE key = 'stripe_events_cutoff';
    IF cutoff IS NULL OR NOT EXISTS (SELECT FROM pg_constraint WHERE conname = 'stripe_events_before_partitions'
                                                            AND convalidated) THEN
      -- No validated range (rows came after 016 found the table empty): a scan, of few rows.
      cutoff := date_trunc('day', clock_timestamp()) + interval '1 day';
    END IF;
    EXECUTE format('ALTER TABLE stripe_events ATTACH PARTITION stripe_events_legacy
                      FOR VALUES FROM (MINVALUE) TO (%L)', cutoff);
    ALTER TABLE stripe_events_legacy DROP CONSTRAINT IF EXISTS stripe_events_before_partitions;
  END IF;
  DELETE FROM paystream_config WHERE key = 'stripe_events_cutoff';
END $$;

-- Rows no range partition takes (none while partitions are made ahead: ops/retention.py);
-- the next maintenance moves them into their own.
CREATE TABLE stripe_events_default PARTITION OF stripe_events DEFAULT;

CREATE FUNCTION paystream_store_event(
  p_id text, p_type text, p_object_id text, p_api_version text, p_livemode boolean,
  p_created timestamptz, p_raw_body text, p_headers jsonb, p_floor timestamptz,
  OUT processed_at timestamptz, OUT outcome text)
LANGUAGE plpgsql VOLATILE
-- p_floor: no row of this id has an earlier received_at (Stripe's `created` less a day, as
-- the caller reckons it: changes/store.py).  As a planned value it prunes the lookup to the
-- partitions since then: about two for a fresh event, however many retention keeps.
SET plan_cache_mode = force_custom_plan AS $$
DECLARE
  found_at timestamptz;
BEGIN
  -- One delivery of an id at a time; each statement below reads what committed before it
  -- (a VOLATILE function's statements take fresh snapshots), so the second of two
  -- concurrent deliveries finds the first's row once the first commits.
  PERFORM pg_advisory_xact_lock(hashtextextended('paystream-stripe-event:' || p_id, 0));
  SELECT s.received_at, s.processed_at, s.outcome INTO found_at, processed_at, outcome
    FROM stripe_events s WHERE s.id = p_id AND s.received_at >= p_floor
   ORDER BY s.received_at LIMIT 1 FOR UPDATE;
  IF NOT FOUND THEN
    INSERT INTO stripe_events (id, type, object_id, api_version, livemode, created, raw_body, headers)
    VALUES (p_id, p_type, p_object_id, p_api_version, p_livemode, p_created, p_raw_body, p_headers);
    processed_at := NULL;
    outcome := NULL;
  ELSIF processed_at IS NULL AND outcome IS DISTINCT FROM 'parked' THEN
    -- Not applied yet (unsupported, invalid, failed): it is applied from the body that
    -- came now, so keep that body and the stored event is always what was applied.
    UPDATE stripe_events s
       SET attempts = s.attempts + 1, type = p_type, object_id = p_object_id,
           api_version = p_api_version, livemode = p_livemode, created = p_created,
           raw_body = p_raw_body, headers = p_headers
     WHERE s.id = p_id AND s.received_at = found_at AND s.received_at >= p_floor;
  ELSE
    -- Applied, or parked (it keeps the body its transaction will apply).
    UPDATE stripe_events s SET attempts = s.attempts + 1
     WHERE s.id = p_id AND s.received_at = found_at AND s.received_at >= p_floor;
  END IF;
END $$;
