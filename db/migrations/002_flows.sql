-- Payment flows: creating transactions through our API, linking further Stripe objects,
-- early events, refund amounts, and the side effects a success routes to.  Every side
-- effect has a unique key, so no replay, reorder or race can apply it twice.

ALTER TABLE transactions
  ADD COLUMN amount_refunded bigint NOT NULL DEFAULT 0 CHECK (amount_refunded >= 0),
  -- What a success does, decided once from the metadata: transaction (plain payment),
  -- contract, ad_sale, wallet, or unrouted (metadata we do not understand; kept for operators).
  ADD COLUMN route text NOT NULL DEFAULT 'transaction'
    CHECK (route IN ('transaction', 'contract', 'ad_sale', 'wallet', 'unrouted'));
CREATE INDEX transactions_unrouted_idx ON transactions (created_at) WHERE route = 'unrouted';
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

-- The design-review platform: each $150 purchase grants 2 extra revisions to a contract.
CREATE TABLE contract_purchases (
  payment_intent_id text PRIMARY KEY,
  contract_id       text NOT NULL,
  transaction_id    text NOT NULL UNIQUE REFERENCES transactions (id),
  revisions         integer NOT NULL CHECK (revisions >= 0),
  amount            bigint NOT NULL,
  created_at        timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX contract_purchases_contract_idx ON contract_purchases (contract_id);
CREATE TABLE contract_usage (
  contract_id text PRIMARY KEY,
  used        integer NOT NULL DEFAULT 0 CHECK (used >= 0)
);
CREATE VIEW contract_revisions AS
  SELECT c.contract_id,
         3 AS included,
         coalesce(p.purchased, 0)::integer AS purchased,
         coalesce(u.used, 0) AS used,
         (3 + coalesce(p.purchased, 0) - coalesce(u.used, 0))::integer AS available
    FROM (SELECT contract_id FROM contract_purchases UNION SELECT contract_id FROM contract_usage) c
    LEFT JOIN (SELECT contract_id, sum(revisions) AS purchased FROM contract_purchases GROUP BY 1) p
           USING (contract_id)
    LEFT JOIN contract_usage u USING (contract_id);

-- Sales made on an external landing page: acknowledged and kept, nothing else.
CREATE TABLE ad_sales (
  payment_intent_id text PRIMARY KEY,
  transaction_id    text NOT NULL UNIQUE REFERENCES transactions (id),
  advertiser_id     text NOT NULL,
  size_id           text NOT NULL,
  publication_id    text NOT NULL,
  amount            bigint NOT NULL,
  currency          text NOT NULL,
  created_at        timestamptz NOT NULL DEFAULT clock_timestamp()
);

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
