-- Refunds as records of their own: made through paystream (POST /v1/transactions/{id}/refunds)
-- or elsewhere (the Stripe Dashboard) and adopted from their events.  The transaction's
-- JSON lists them (`refunds`, kept in its `details`, logged and pushed with each move).
--
-- A refund made through paystream is written here, `pending` and without a Stripe id,
-- in the database transaction that locks its transaction and checks that it fits in
-- what was captured less what is refunded or being refunded, before Stripe is called:
-- concurrent refunds of one transaction queue on that lock and can never together
-- exceed it.
CREATE TABLE refunds (
  id              text PRIMARY KEY CHECK (id ~ '^rf_[0-9A-Za-z]{26}$'),
  transaction_id  text NOT NULL REFERENCES transactions (id),
  stripe_id       text UNIQUE,  -- re_…, once Stripe made it
  amount          bigint NOT NULL CHECK (amount > 0),
  currency        text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
  reason          text,
  metadata        jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(metadata) = 'object'),
  status          text NOT NULL,
  failure_reason  text,
  origin          text NOT NULL CHECK (origin IN ('paystream', 'stripe')),
  idempotency_key text,
  request_hash    text,
  -- While a request calls Stripe for it: others with its Idempotency-Key wait, and the
  -- recovery pass leaves it alone, until this passes (then the call is made again, with
  -- the same Stripe idempotency key: never a second refund).
  claimed_until   timestamptz,
  created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
  updated_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
  UNIQUE (transaction_id, idempotency_key)
);
CREATE INDEX refunds_transaction_idx ON refunds (transaction_id, created_at);

-- A refund's status only moves forward: pending, then requires_action, then succeeded,
-- then failed or canceled (Stripe may fail a refund it had reported succeeded).
CREATE FUNCTION paystream_refund_rank(s text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE s WHEN 'pending' THEN 0 WHEN 'requires_action' THEN 1 WHEN 'succeeded' THEN 2
                WHEN 'failed' THEN 3 WHEN 'canceled' THEN 3 END
$$;
ALTER TABLE refunds ADD CONSTRAINT refunds_status_check CHECK (paystream_refund_rank(status) IS NOT NULL);

CREATE FUNCTION paystream_refunds_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.id <> OLD.id OR NEW.transaction_id <> OLD.transaction_id OR NEW.amount <> OLD.amount THEN
    RAISE EXCEPTION 'refund %: id, transaction and amount are fixed', OLD.id USING ERRCODE = 'check_violation';
  END IF;
  IF OLD.stripe_id IS NOT NULL AND NEW.stripe_id IS DISTINCT FROM OLD.stripe_id THEN
    RAISE EXCEPTION 'refund %: its Stripe id is fixed', OLD.id USING ERRCODE = 'check_violation';
  END IF;
  IF paystream_refund_rank(NEW.status) < paystream_refund_rank(OLD.status)
     OR (OLD.status IN ('failed', 'canceled') AND NEW.status <> OLD.status) THEN
    RAISE EXCEPTION 'refund %: % cannot move to %', OLD.id, OLD.status, NEW.status USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END
$$;
CREATE TRIGGER refunds_guard BEFORE UPDATE ON refunds FOR EACH ROW EXECUTE FUNCTION paystream_refunds_guard();
