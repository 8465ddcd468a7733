-- A disputed payment carries its dispute ({id, amount, currency, status}), so that a
-- dispute closed as won is logged (and pushed) as news, and effects such as the wallet
-- ledger can reverse the disputed amount and post it back once each.
ALTER TABLE transactions
  ADD COLUMN dispute jsonb CHECK (dispute IS NULL OR jsonb_typeof(dispute) = 'object');
