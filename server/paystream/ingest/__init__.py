"""Stripe's bytes in: verify the signature, bound the envelope, store the raw event and
interpret it (which object, which change)."""
