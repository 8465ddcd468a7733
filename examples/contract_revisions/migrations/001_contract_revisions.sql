-- The design-review platform: each $150 purchase grants 2 extra revisions to a contract.
-- IF NOT EXISTS: databases from before effects were plug-ins already hold these tables
-- (with their data); this adopts them.
CREATE TABLE IF NOT EXISTS contract_purchases (
  payment_intent_id text PRIMARY KEY,
  contract_id       text NOT NULL,
  transaction_id    text NOT NULL UNIQUE REFERENCES transactions (id),
  revisions         integer NOT NULL CHECK (revisions >= 0),
  amount            bigint NOT NULL,
  created_at        timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS contract_purchases_contract_idx ON contract_purchases (contract_id);
CREATE TABLE IF NOT EXISTS contract_usage (
  contract_id text PRIMARY KEY,
  used        integer NOT NULL DEFAULT 0 CHECK (used >= 0)
);
CREATE OR REPLACE VIEW contract_revisions AS
  SELECT c.contract_id,
         3 AS included,
         coalesce(p.purchased, 0)::integer AS purchased,
         coalesce(u.used, 0) AS used,
         (3 + coalesce(p.purchased, 0) - coalesce(u.used, 0))::integer AS available
    FROM (SELECT contract_id FROM contract_purchases UNION SELECT contract_id FROM contract_usage) c
    LEFT JOIN (SELECT contract_id, sum(revisions) AS purchased FROM contract_purchases GROUP BY 1) p
           USING (contract_id)
    LEFT JOIN contract_usage u USING (contract_id);
