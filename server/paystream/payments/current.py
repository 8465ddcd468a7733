"""What Stripe says about an object now, as a Change: the refresh endpoint, the sweeper
and the outbox read an object and apply its state through the same state machine and
effects as a webhook.  The change is stamped now (Stripe's whole seconds): it is the
newest knowledge there is, so a webhook about an older state that arrives later is
late news and changes nothing.  A subscription is read as its own reads are
(payments/subscriptions.current: with a failed renewal's error, and authoritative)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from paystream.changes.lifecycle import RANK, Change
from paystream.ingest import checkout
from paystream.ingest.stripe_events import amount_captured
from paystream.payments import subscriptions
from paystream.payments.stripe_api import StripeApi

# An invoice's status, as ours (draft and open: nothing paid yet, no news).
_INVOICE_STATUS = {"paid": "succeeded", "void": "canceled"}


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def change_from_payment_intent(pi: Any, at: datetime) -> Change | None:
    status = _get(pi, "status")
    if status not in RANK:
        return None
    error = _get(pi, "last_payment_error")
    if status == "requires_payment_method" and error:
        return Change(status, at, {"code": _get(error, "code") or "payment_failed",
                                   "message": _get(error, "message")})
    charge = _get(pi, "latest_charge")
    if status == "succeeded" and charge is not None and not isinstance(charge, str):
        refunded = _get(charge, "amount_refunded") or 0
        amount = _get(charge, "amount") or 0
        if isinstance(refunded, int) and refunded > 0:
            full = _get(charge, "refunded") is True or (amount > 0 and refunded >= amount)
            return Change("refunded" if full else "partially_refunded", at, amount_refunded=refunded,
                          amount_captured=amount_captured(pi))
    return Change(status, at, amount_captured=amount_captured(pi) if status == "succeeded" else None)


def change_from_object(obj: Any, at: datetime) -> Change | None:
    """A PaymentIntent, SetupIntent, invoice or Checkout Session as we would have it
    after its events."""
    kind = _get(obj, "object")
    if kind == "checkout.session":
        # A session whose delayed payment failed stays `complete` and `unpaid` at Stripe:
        # read as processing, which changes nothing once the failure made it canceled.
        status = checkout.status_of(_get(obj, "status"), _get(obj, "payment_status"))
        return Change(status, at) if status else None
    if kind == "invoice":
        status = _INVOICE_STATUS.get(_get(obj, "status"))
        return Change(status, at) if status else None
    if kind == "setup_intent":
        status = _get(obj, "status")
        error = _get(obj, "last_setup_error")
        if status == "requires_payment_method" and error:
            return Change(status, at, {"code": _get(error, "code") or "setup_failed",
                                       "message": _get(error, "message")})
        return Change(status, at) if status in RANK else None
    return change_from_payment_intent(obj, at)


async def read_now(api: StripeApi, pool: asyncpg.Pool, stripe_id: str, at: datetime) -> Change | None:
    """Read the transaction's Stripe object and say what it means now.  A subscription
    (sub_) is no PaymentIntent: read as a PaymentIntent, Stripe would answer 404."""
    if stripe_id.startswith("sub_"):
        return await subscriptions.current(api, pool, stripe_id)
    return change_from_object(await api.retrieve(stripe_id), at)
