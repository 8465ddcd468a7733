-- The core: transactions, the raw Stripe events that move them, and the append-only
-- per-transaction event log that streams resume from.
--
-- The database, not only Python, enforces the rules that keep money correct:
--   * a status is one of the contract's values and never moves to a lower rank;
--   * a Stripe event id is stored once (idempotent delivery);
--   * transactions.seq grows by exactly one per logged event, and every log row carries
--     the seq its transaction holds at that moment, so the log has no gaps;
--   * the log is append-only.

-- Rank of a status. canceled and succeeded share rank 5: both end the payment attempt.
-- Refunds and disputes rank above succeeded because they can only follow it.
CREATE FUNCTION paystream_status_rank(s text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE s
    WHEN 'requires_payment_method' THEN 0
    WHEN 'requires_confirmation'   THEN 1
    WHEN 'requires_action'         THEN 2
    WHEN 'processing'              THEN 3
    WHEN 'requires_capture'        THEN 4
    WHEN 'succeeded'               THEN 5
    WHEN 'canceled'                THEN 5
    WHEN 'partially_refunded'      THEN 6
    WHEN 'refunded'                THEN 7
    WHEN 'disputed'                THEN 8
  END
$$;

-- May a transaction move from old_status to new_status?  `declined` says the move carries
-- a last_error: Stripe sends a declined PaymentIntent back to requires_payment_method so
-- the customer can retry, which is the one step down we accept, and only before success.
-- server/paystream/lifecycle.py mirrors this function; tests check they agree.
CREATE FUNCTION paystream_transition_allowed(old_status text, new_status text, declined boolean)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE
    WHEN old_status = new_status THEN true
    WHEN old_status = 'canceled' THEN false
    WHEN new_status = 'canceled' THEN paystream_status_rank(old_status) < 5
    WHEN new_status = 'requires_payment_method' AND declined
      THEN paystream_status_rank(old_status) < 5
    ELSE paystream_status_rank(new_status) > paystream_status_rank(old_status)
  END
$$;

CREATE TABLE transactions (
  id          text PRIMARY KEY CHECK (id ~ '^txn_[0-9A-Za-z]{26}$'),
  stripe_id   text UNIQUE,
  kind        text NOT NULL
              CHECK (kind IN ('payment', 'card_validation', 'wallet_top_up', 'invoice')),
  status      text NOT NULL CHECK (paystream_status_rank(status) IS NOT NULL),
  amount      bigint NOT NULL CHECK (amount >= 0),
  currency    text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
  customer_id text,
  metadata    jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(metadata) = 'object'),
  last_error  jsonb,
  validated   boolean NOT NULL DEFAULT false,
  seq         integer NOT NULL DEFAULT 0 CHECK (seq >= 0),
  -- Stripe's `created` of the event that set the current status: how an event delivered
  -- late is told apart from a newer one (Stripe does not deliver in order).
  status_at   timestamptz,
  created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
  updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX transactions_customer_idx ON transactions (customer_id) WHERE customer_id IS NOT NULL;

CREATE FUNCTION paystream_transactions_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF NOT paystream_transition_allowed(OLD.status, NEW.status, NEW.last_error IS NOT NULL) THEN
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
CREATE TRIGGER transactions_guard BEFORE UPDATE ON transactions
  FOR EACH ROW EXECUTE FUNCTION paystream_transactions_guard();

-- Every webhook delivery we accepted as authentic, raw, before anything else happens to it.
CREATE TABLE stripe_events (
  id             text PRIMARY KEY CHECK (id ~ '^evt_'),
  type           text NOT NULL,
  object_id      text,
  api_version    text,
  livemode       boolean,
  created        timestamptz,           -- Stripe's event.created
  raw_body       text NOT NULL,         -- exactly the bytes Stripe signed
  headers        jsonb NOT NULL,
  received_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
  processed_at   timestamptz,           -- NULL: stored, not (yet) applied
  transaction_id text REFERENCES transactions (id),
  -- applied | no_change | unrouted | unsupported | failed
  outcome        text,
  error          text,
  attempts       integer NOT NULL DEFAULT 1
);
CREATE INDEX stripe_events_object_idx ON stripe_events (object_id);
CREATE INDEX stripe_events_unprocessed_idx ON stripe_events (received_at) WHERE processed_at IS NULL;

-- The append-only log: what every stream replays from.  `data` is the exact JSON pushed.
CREATE TABLE transaction_events (
  transaction_id  text NOT NULL REFERENCES transactions (id),
  seq             integer NOT NULL CHECK (seq > 0),
  status          text NOT NULL CHECK (paystream_status_rank(status) IS NOT NULL),
  previous_status text,
  stripe_event_id text,
  event_type      text,
  data            json NOT NULL,         -- json, not jsonb: kept byte-for-byte as pushed
  created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
  PRIMARY KEY (transaction_id, seq)
);

CREATE FUNCTION paystream_events_seq_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE current_seq integer;
BEGIN
  SELECT seq INTO current_seq FROM transactions WHERE id = NEW.transaction_id;
  IF current_seq IS DISTINCT FROM NEW.seq THEN
    RAISE EXCEPTION 'transaction %: log row seq % does not match transaction seq %',
      NEW.transaction_id, NEW.seq, current_seq USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END
$$;
CREATE TRIGGER transaction_events_seq BEFORE INSERT ON transaction_events
  FOR EACH ROW EXECUTE FUNCTION paystream_events_seq_guard();

CREATE FUNCTION paystream_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION '% is append-only', TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER transaction_events_append_only BEFORE UPDATE OR DELETE ON transaction_events
  FOR EACH ROW EXECUTE FUNCTION paystream_append_only();
