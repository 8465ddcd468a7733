-- Signed webhooks to the merchant's backend (PAYSTREAM_OUTBOUND_URL): one row per logged
-- event, queued by the built-in `outbound` effect in the database transaction that logs
-- the event, and delivered after commit by any paystream process (payments/outbound.py).
--
-- A row is only a pointer to its log row: the message's `data` is read from
-- transaction_events at delivery time, so it is the pushed event byte for byte, with the
-- fields every effect added.  The effect runs before its log row is written, in the same
-- database transaction, so the reference to the log is checked at commit.
--
-- Order: the pending rows of one transaction are sent one at a time, lowest seq first.
-- Only the lowest pending row of a transaction has a next_attempt_at; those queued behind
-- it wait with NULL, and the worker that delivers (or gives up on) a row makes the next one
-- due in the same database transaction.  So the claim is one index lookup however many
-- rows wait behind a failing one.
CREATE TABLE outbound_deliveries (
  id              bigserial PRIMARY KEY,
  webhook_id      text NOT NULL UNIQUE,        -- the webhook-id header: the same on every attempt and replay
  transaction_id  text NOT NULL,
  seq             integer NOT NULL,
  attempts        integer NOT NULL DEFAULT 0,  -- since it was queued (or replayed)
  next_attempt_at timestamptz,                 -- NULL: waiting for an earlier seq of its transaction
  queued_at       timestamptz NOT NULL DEFAULT clock_timestamp(),  -- logged, or replayed
  last_attempt_at timestamptz,
  delivered_at    timestamptz,                 -- a 2xx answer
  failed_at       timestamptz,                 -- the retry schedule ran out
  last_status     integer,                     -- the last answer's HTTP status (NULL: no answer)
  last_error      text,
  created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
  UNIQUE (transaction_id, seq),
  CHECK (delivered_at IS NULL OR failed_at IS NULL),
  FOREIGN KEY (transaction_id, seq) REFERENCES transaction_events (transaction_id, seq)
    DEFERRABLE INITIALLY DEFERRED
);
-- The claim: the earliest due row.
CREATE INDEX outbound_deliveries_due_idx ON outbound_deliveries (next_attempt_at)
  WHERE delivered_at IS NULL AND failed_at IS NULL AND next_attempt_at IS NOT NULL;
-- A transaction's pending rows, lowest seq first (who is next; is anything before me).
CREATE INDEX outbound_deliveries_pending_idx ON outbound_deliveries (transaction_id, seq)
  WHERE delivered_at IS NULL AND failed_at IS NULL;
CREATE INDEX outbound_deliveries_failed_idx ON outbound_deliveries (id) WHERE failed_at IS NOT NULL;
