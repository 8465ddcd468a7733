"""paystream: realtime payment-status push over Stripe webhooks and Postgres NOTIFY."""

__version__ = "0.1.0"
