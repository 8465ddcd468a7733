-- The sweeper re-reads from Stripe every transaction that has not reached success, of any
-- kind and status, once it has had no news for PAYSTREAM_STUCK_AFTER.  checked_at is its
-- last read, so an abandoned checkout is read ever more rarely instead of every pass.
ALTER TABLE transactions ADD COLUMN checked_at timestamptz;
DROP INDEX IF EXISTS transactions_stuck_idx;
CREATE INDEX transactions_unsettled_idx ON transactions (greatest(updated_at, checked_at))
  WHERE paystream_status_rank(status) < 5 AND stripe_id IS NOT NULL;
