-- The sweeper re-reads a subscription still `incomplete` after PAYSTREAM_STUCK_AFTER, as it
-- re-reads every payment-like transaction before success (005); this is its index.
CREATE INDEX transactions_incomplete_subscriptions_idx ON transactions (greatest(updated_at, checked_at))
  WHERE kind = 'subscription' AND status = 'incomplete' AND stripe_id IS NOT NULL;
