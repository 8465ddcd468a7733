-- Payment flows: creating transactions through our API, linking further Stripe objects,
-- early events, refund amounts, and the built-in effects' tables (wallet ledger, outbox).
-- Every effect's row has a unique key, so no replay, reorder or race can apply it twice.
-- (A merchant's own effects bring their own migrations: see examples/.)

ALTER TABLE transactions
  ADD COLUMN amount_refunded bigint NOT NULL DEFAULT 0 CHECK (amount_refunded >= 0);
CREATE INDEX transactions_stuck_idx ON transactions (updated_at)
  WHERE status IN ('processing', 'requires_action', 'requires_capture');

-- Stripe objects other than the transaction's own that speak for it: an invoice's
-- PaymentIntent, for instance.
CREATE TABLE transaction_links (
  stripe_id      text PRIMARY KEY,
  transaction_id text NOT NULL REFERENCES transactions (id)
);

-- Idempotency-Key on POST /v1/transactions: the first answer, given again.
CREATE TABLE idempotency_keys (
  key            text PRIMARY KEY,
  request_hash   text NOT NULL,
  transaction_id text REFERENCES transactions (id),
  status_code    integer,
  response       jsonb,                       -- NULL while the first request is running
  created_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Events naming (by metadata.transaction_id) a transaction not written yet; applied by the
-- database transaction that writes it.
CREATE TABLE parked_events (
  stripe_event_id text PRIMARY KEY REFERENCES stripe_events (id),
  transaction_id  text NOT NULL,
  parked_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX parked_events_txn_idx ON parked_events (transaction_id);

-- Double-entry ledger for wallet top-ups: append-only, every entry group sums to zero
-- (checked at commit), a correction is a reversing group, never an edit.
CREATE TABLE ledger_entries (
  id             bigserial PRIMARY KEY,
  entry_group    text NOT NULL,               -- one business fact, e.g. topup:txn_…
  transaction_id text NOT NULL REFERENCES transactions (id),
  account        text NOT NULL,               -- wallet:cus_… or stripe:clearing
  amount         bigint NOT NULL CHECK (amount <> 0),
  currency       text NOT NULL,
  created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
  UNIQUE (entry_group, account)
);
CREATE INDEX ledger_entries_account_idx ON ledger_entries (account);
CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
  FOR EACH ROW EXECUTE FUNCTION paystream_append_only();

CREATE FUNCTION paystream_ledger_balanced() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF (SELECT sum(amount) FROM ledger_entries WHERE entry_group = NEW.entry_group) <> 0 THEN
    RAISE EXCEPTION 'ledger entry group % does not balance', NEW.entry_group
      USING ERRCODE = 'check_violation';
  END IF;
  RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER ledger_entries_balanced AFTER INSERT ON ledger_entries
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION paystream_ledger_balanced();

-- Calls to Stripe that a committed change asks for (e.g. cancel a card validation's
-- authorisation), made after commit with an idempotency key and retried until done.
CREATE TABLE outbox (
  id             bigserial PRIMARY KEY,
  kind           text NOT NULL CHECK (kind IN ('cancel_validation', 'expire_authorization')),
  transaction_id text NOT NULL REFERENCES transactions (id),
  created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
  done_at        timestamptz,
  attempts       integer NOT NULL DEFAULT 0,
  last_error     text,
  UNIQUE (kind, transaction_id)
);
CREATE INDEX outbox_pending_idx ON outbox (id) WHERE done_at IS NULL;
