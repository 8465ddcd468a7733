"""Our calls to Stripe: creating transactions (create), the one Stripe client
(stripe_api), and the outbox and sweeper that act after commit (recovery)."""
