-- A dispute takes back the revisions a purchase granted while it holds the funds; one
-- closed as won gives them back.  Adjustments are keyed, so each happens once.
CREATE TABLE IF NOT EXISTS contract_adjustments (
  key         text PRIMARY KEY,                  -- dispute:<txn>:<du> or dispute_won:<txn>:<du>
  contract_id text NOT NULL,
  revisions   integer NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS contract_adjustments_contract_idx ON contract_adjustments (contract_id);

CREATE OR REPLACE VIEW contract_revisions AS
  SELECT c.contract_id,
         3 AS included,
         (coalesce(p.purchased, 0) + coalesce(a.adjusted, 0))::integer AS purchased,
         coalesce(u.used, 0) AS used,
         (3 + coalesce(p.purchased, 0) + coalesce(a.adjusted, 0) - coalesce(u.used, 0))::integer AS available
    FROM (SELECT contract_id FROM contract_purchases UNION SELECT contract_id FROM contract_usage) c
    LEFT JOIN (SELECT contract_id, sum(revisions) AS purchased FROM contract_purchases GROUP BY 1) p
           USING (contract_id)
    LEFT JOIN (SELECT contract_id, sum(revisions) AS adjusted FROM contract_adjustments GROUP BY 1) a
           USING (contract_id)
    LEFT JOIN contract_usage u USING (contract_id);
