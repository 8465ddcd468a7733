-- The ledger covers every money movement, not only wallet top-ups (the built-in `ledger`
-- effect, server/paystream/effects/ledger.py): captured payments to merchant:revenue,
-- refunds and failed refunds put back, disputes through stripe:disputed.
--
-- Balanced per currency: a group is one business fact in one currency, so +100 USD and
-- -100 EUR no longer pass as zero.  Checked at commit (deferred), for every row inserted,
-- whatever inserted it; rows can never change afterwards (UPDATE and DELETE were already
-- refused row by row; TRUNCATE, which skips row triggers, is refused too).
CREATE OR REPLACE FUNCTION paystream_ledger_balanced() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT FROM ledger_entries WHERE entry_group = NEW.entry_group
              GROUP BY currency HAVING sum(amount) <> 0) THEN
    RAISE EXCEPTION 'ledger entry group % does not balance', NEW.entry_group
      USING ERRCODE = 'check_violation';
  END IF;
  RETURN NULL;
END
$$;

CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
  FOR EACH STATEMENT EXECUTE FUNCTION paystream_append_only();

CREATE INDEX ledger_entries_transaction_idx ON ledger_entries (transaction_id);
CREATE INDEX ledger_entries_created_idx ON ledger_entries (created_at);

-- Opening entries for what was paid before the ledger covered it, under the keys the
-- effect uses, so a later event of the same transaction posts only what is new.
-- Wallet top-ups already have theirs (the wallet effect); a Checkout Session's money is its
-- PaymentIntent's, posted there.
WITH paid AS (
  SELECT id, amount, currency, least(amount_refunded, amount) AS refunded, dispute
    FROM transactions
   WHERE kind NOT IN ('wallet_top_up', 'checkout') AND amount > 0
     AND status IN ('succeeded', 'partially_refunded', 'refunded', 'disputed')),
disputed AS (
  SELECT id, currency, dispute ->> 'id' AS du, dispute ->> 'status' AS st,
         least((dispute ->> 'amount')::bigint, amount) AS amount
    FROM paid
   WHERE dispute ->> 'status' IN ('needs_response', 'under_review', 'won', 'lost')
     AND coalesce((dispute ->> 'amount')::bigint, 0) > 0),
entries (entry_group, transaction_id, account, amount, currency) AS (
  SELECT 'capture:' || id, id, 'stripe:clearing', -amount, currency FROM paid
  UNION ALL SELECT 'capture:' || id, id, 'merchant:revenue', amount, currency FROM paid
  UNION ALL SELECT 'refund:' || id || ':' || refunded, id, 'merchant:revenue', -refunded, currency
              FROM paid WHERE refunded > 0
  UNION ALL SELECT 'refund:' || id || ':' || refunded, id, 'stripe:clearing', refunded, currency
              FROM paid WHERE refunded > 0
  UNION ALL SELECT 'dispute:' || id || ':' || du, id, 'stripe:disputed', -amount, currency FROM disputed
  UNION ALL SELECT 'dispute:' || id || ':' || du, id, 'stripe:clearing', amount, currency FROM disputed
  UNION ALL SELECT 'dispute_won:' || id || ':' || du, id, 'stripe:clearing', -amount, currency
              FROM disputed WHERE st = 'won'
  UNION ALL SELECT 'dispute_won:' || id || ':' || du, id, 'stripe:disputed', amount, currency
              FROM disputed WHERE st = 'won'
  UNION ALL SELECT 'dispute_lost:' || id || ':' || du, id, 'merchant:revenue', -amount, currency
              FROM disputed WHERE st = 'lost'
  UNION ALL SELECT 'dispute_lost:' || id || ':' || du, id, 'stripe:disputed', amount, currency
              FROM disputed WHERE st = 'lost')
INSERT INTO ledger_entries (entry_group, transaction_id, account, amount, currency)
SELECT entry_group, transaction_id, account, amount, currency FROM entries
ON CONFLICT (entry_group, account) DO NOTHING;
