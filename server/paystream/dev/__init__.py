"""`paystream dev` and `paystream trigger` only: the /demo checkout, the local Stripe
stand-in, building signed events.  `paystream serve` never imports this package."""
