-- Stripe Checkout Sessions (and the Payment Links that make them) are transactions of
-- kind 'checkout'.  The kind CHECK is rebuilt whole, whatever earlier migrations named
-- it, listing every kind this code knows (subscriptions' 'subscription' included), so
-- the result is the same whichever of this and the subscriptions migration runs first.
DO $$
DECLARE c record;
BEGIN
  FOR c IN SELECT conname FROM pg_constraint
            WHERE conrelid = 'transactions'::regclass AND contype = 'c'
              AND pg_get_constraintdef(oid) LIKE '%kind%'
  LOOP
    EXECUTE format('ALTER TABLE transactions DROP CONSTRAINT %I', c.conname);
  END LOOP;
END
$$;
ALTER TABLE transactions ADD CONSTRAINT transactions_kind_check
  CHECK (kind IN ('payment', 'card_validation', 'wallet_top_up', 'invoice', 'subscription', 'checkout'));

-- A transaction that follows other Stripe objects' transactions without speaking for
-- them: a Checkout Session follows the PaymentIntent (and, in subscription mode, the
-- subscription) it made.  Those objects keep transactions of their own, whichever of
-- their events or the session's arrives first; this row (by Stripe id, so it may name a
-- transaction that does not exist yet) lets the session's watcher hear their refunds and
-- disputes, and a token for the session read them.  Unlike transaction_links, it never
-- routes an event.
CREATE TABLE transaction_follows (
  stripe_id      text NOT NULL,
  transaction_id text NOT NULL REFERENCES transactions (id),
  PRIMARY KEY (stripe_id, transaction_id)
);
CREATE INDEX transaction_follows_follower_idx ON transaction_follows (transaction_id);
