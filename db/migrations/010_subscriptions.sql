-- Subscriptions: kind 'subscription', Stripe's subscription statuses, and each kind's own
-- transition check (server/paystream/changes/machine_subscription.py mirrors it).
--
-- A kind's own fields of the transaction JSON (a subscription's current_period_end,
-- cancel_at_period_end, trial_end, next_payment_attempt; an invoice's subscription_id)
-- live in `details`, moved and logged with the status.
ALTER TABLE transactions
  ADD COLUMN details jsonb CHECK (details IS NULL OR jsonb_typeof(details) = 'object');

ALTER TABLE transactions DROP CONSTRAINT transactions_kind_check;
ALTER TABLE transactions ADD CONSTRAINT transactions_kind_check
  CHECK (kind IN ('payment', 'card_validation', 'wallet_top_up', 'invoice', 'subscription'));

CREATE FUNCTION paystream_subscription_status(s text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT s IN ('incomplete', 'incomplete_expired', 'trialing', 'active', 'past_due', 'unpaid',
               'canceled', 'paused')
$$;

-- Subscriptions move both ways (active -> past_due -> active): Stripe's time orders them,
-- not a rank.  Nothing leaves an end (canceled, incomplete_expired); incomplete is only a
-- beginning, and only it can expire.
CREATE FUNCTION paystream_subscription_transition_allowed(old_status text, new_status text)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE
    WHEN old_status = new_status THEN true
    WHEN old_status IN ('canceled', 'incomplete_expired') OR new_status = 'incomplete' THEN false
    WHEN new_status = 'incomplete_expired' THEN old_status = 'incomplete'
    ELSE paystream_subscription_status(new_status)
  END
$$;

-- A status is one of its kind's.
CREATE FUNCTION paystream_status_of_kind(kind text, status text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN kind = 'subscription' THEN paystream_subscription_status(status)
              ELSE paystream_status_rank(status) IS NOT NULL END
$$;

ALTER TABLE transactions DROP CONSTRAINT transactions_status_check;
ALTER TABLE transactions ADD CONSTRAINT transactions_status_check CHECK (paystream_status_of_kind(kind, status));
ALTER TABLE transaction_events DROP CONSTRAINT transaction_events_status_check;
ALTER TABLE transaction_events ADD CONSTRAINT transaction_events_status_check
  CHECK (paystream_status_rank(status) IS NOT NULL OR paystream_subscription_status(status));

CREATE OR REPLACE FUNCTION paystream_transactions_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE allowed boolean;
BEGIN
  IF OLD.kind = 'subscription' THEN
    allowed := paystream_subscription_transition_allowed(OLD.status, NEW.status);
  ELSE
    allowed := paystream_transition_allowed(OLD.status, NEW.status, NEW.last_error IS NOT NULL);
  END IF;
  IF NOT allowed THEN
    RAISE EXCEPTION 'transaction %: status may not move from % to %', OLD.id, OLD.status, NEW.status
      USING ERRCODE = 'check_violation';
  END IF;
  IF NEW.seq NOT IN (OLD.seq, OLD.seq + 1) THEN
    RAISE EXCEPTION 'transaction %: seq must grow by one (% -> %)', OLD.id, OLD.seq, NEW.seq
      USING ERRCODE = 'check_violation';
  END IF;
  IF NEW.id <> OLD.id OR NEW.kind <> OLD.kind THEN
    RAISE EXCEPTION 'transaction %: id and kind are fixed', OLD.id USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END
$$;

-- A read of a subscription from Stripe that a change asked for (an event that ties with
-- the state's second, an invoice of the subscription that moved): queued with the change,
-- made after commit by the recovery loop.  Queued again once done, a job starts over.
ALTER TABLE outbox DROP CONSTRAINT outbox_kind_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_kind_check
  CHECK (kind IN ('cancel_validation', 'expire_authorization', 'read_subscription'));
