"""Signed webhooks to the merchant's backend: the worker that delivers what effects/outbound.py
queues (Standard Webhooks signatures, retries, replays).  Not a call to Stripe, so not in
payments/."""
