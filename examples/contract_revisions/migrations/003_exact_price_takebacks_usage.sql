-- The Observatory's rule, whole: 2 revisions for exactly 15,000 USD (any other payment
-- credits nothing and is flagged); a refund or a dispute that withdrew the funds takes
-- the grant back (a won dispute returns it, a lost one does not); a take-back beyond what
-- is left unused is flagged as a shortfall; using a revision is use_revision(), which
-- refuses below zero.  available = 3 + purchased − used, for every contract.
ALTER TABLE contract_purchases ADD COLUMN IF NOT EXISTS currency text;

-- Adjustments now name their transaction (older rows: dispute:<txn>:<du> keys).
ALTER TABLE contract_adjustments ADD COLUMN IF NOT EXISTS transaction_id text;
UPDATE contract_adjustments SET transaction_id = split_part(key, ':', 2) WHERE transaction_id IS NULL;
CREATE INDEX IF NOT EXISTS contract_adjustments_txn_idx ON contract_adjustments (transaction_id);

-- What the merchant must look at: a payment that bought nothing (wrong_price: its amount
-- or currency is not 15,000 USD) and a take-back of revisions already used (shortfall).
CREATE TABLE IF NOT EXISTS contract_flags (
  key            text PRIMARY KEY,              -- wrong_price:<txn> or shortfall:<txn>:<seq>
  contract_id    text NOT NULL,
  transaction_id text NOT NULL,
  reason         text NOT NULL CHECK (reason IN ('wrong_price', 'shortfall')),
  detail         jsonb NOT NULL,
  created_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS contract_flags_contract_idx ON contract_flags (contract_id);

DROP VIEW IF EXISTS contract_revisions;
CREATE VIEW contract_revisions AS
  SELECT c.contract_id,
         3 AS included,
         (coalesce(p.purchased, 0) + coalesce(a.adjusted, 0))::integer AS purchased,
         coalesce(u.used, 0) AS used,
         (3 + coalesce(p.purchased, 0) + coalesce(a.adjusted, 0) - coalesce(u.used, 0))::integer AS available,
         greatest(0, coalesce(u.used, 0) - 3 - coalesce(p.purchased, 0) - coalesce(a.adjusted, 0))::integer
           AS shortfall
    FROM (SELECT contract_id FROM contract_purchases UNION SELECT contract_id FROM contract_usage
          UNION SELECT contract_id FROM contract_adjustments) c
    LEFT JOIN (SELECT contract_id, sum(revisions) AS purchased FROM contract_purchases GROUP BY 1) p
           USING (contract_id)
    LEFT JOIN (SELECT contract_id, sum(revisions) AS adjusted FROM contract_adjustments GROUP BY 1) a
           USING (contract_id)
    LEFT JOIN contract_usage u USING (contract_id);

-- Any contract, purchased for or not: a contract no one has paid for reads 3.
CREATE OR REPLACE FUNCTION contract_available(contract text) RETURNS integer
LANGUAGE sql STABLE AS $$
  SELECT coalesce((SELECT available FROM contract_revisions WHERE contract_id = contract), 3)
$$;

-- The product spends a revision with this: the contract's usage row is locked, so two at
-- once cannot both take the last one, nor race a take-back (the effect locks it too).
-- Raises check_violation when none is available; returns what is left.
CREATE OR REPLACE FUNCTION use_revision(contract text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
  left_over integer;
BEGIN
  INSERT INTO contract_usage (contract_id, used) VALUES (contract, 0) ON CONFLICT DO NOTHING;
  PERFORM FROM contract_usage WHERE contract_id = contract FOR UPDATE;
  left_over := contract_available(contract);
  IF left_over < 1 THEN
    RAISE EXCEPTION 'contract % has no revision available (% left)', contract, left_over
      USING ERRCODE = 'check_violation';
  END IF;
  UPDATE contract_usage SET used = used + 1 WHERE contract_id = contract;
  RETURN left_over - 1;
END
$$;
