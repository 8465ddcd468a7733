-- Side effects became plug-ins (paystream.effects): the core no longer decides a
-- "route" per transaction.  Databases created before this change drop the column;
-- their seed tables (contract_purchases, ad_sales, …), if any, are left with their data
-- and adopted by the examples' own migrations, which create them only if missing.
DROP INDEX IF EXISTS transactions_unrouted_idx;
ALTER TABLE transactions DROP COLUMN IF EXISTS route;
