"""What a Checkout Session event means: the session is a transaction of kind `checkout`,
whatever made it (our POST /v1/transactions, a Payment Link, the merchant's own code).

Its status speaks the payment statuses a page already knows: `requires_payment_method`
while open, `processing` once complete but unpaid (a delayed payment method),
`succeeded` when paid or nothing is due, `canceled` when expired, and `canceled` with a
`last_error` when the delayed payment failed.  The session's own `status` and
`payment_status` are derived back from these (session_fields), so they need no column.

The PaymentIntent, SetupIntent and subscription a session made keep transactions of
their own (their events name no session, so they may arrive first); the session
follows them (FOLLOWED_FIELDS, changes/follows.py).  ingest/stripe_events.py reads the
fields; these are the session's rules.  Pure functions, no I/O.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from paystream.changes.lifecycle import RANK, Change

ASYNC_PAYMENT_FAILED = {"code": "async_payment_failed",
                        "message": "the delayed payment method failed after the customer completed checkout"}

# Stripe's checkout.session.* event types, every one of which paystream reads.
EVENT_TYPES = ("checkout.session.completed", "checkout.session.async_payment_succeeded",
               "checkout.session.async_payment_failed", "checkout.session.expired")


def status_of(session_status: Any, payment_status: Any) -> str | None:
    """Our status for a session as Stripe has it now (a refresh, the sweeper)."""
    if session_status == "open":
        return "requires_payment_method"
    if session_status == "expired":
        return "canceled"
    if session_status == "complete":
        return "processing" if payment_status == "unpaid" else "succeeded"
    return None


def change_of(event_type: str, session: dict[str, Any], at: datetime) -> Change | None:
    if event_type == "checkout.session.async_payment_succeeded":
        return Change("succeeded", at)
    if event_type == "checkout.session.async_payment_failed":
        return Change("canceled", at, dict(ASYNC_PAYMENT_FAILED))
    if event_type == "checkout.session.expired":
        return Change("canceled", at)
    if event_type == "checkout.session.completed":
        status = status_of("complete", session.get("payment_status"))
        return Change(status, at) if status else None
    return None


# The fields naming what a session made: its PaymentIntent, SetupIntent, subscription.
FOLLOWED_FIELDS = ("payment_intent", "setup_intent", "subscription")


def session_fields(status: str, last_error: Any, amount: int) -> dict[str, str]:
    """The session's own `session_status` and `payment_status`, from the transaction."""
    if amount == 0:
        payment = "no_payment_required"
    elif status == "canceled" or RANK[status] < RANK["succeeded"]:
        payment = "unpaid"
    else:
        payment = "paid"
    if status == "requires_payment_method":
        session = "open"
    elif status == "canceled" and not last_error:
        session = "expired"
    else:
        session = "complete"
    return {"session_status": session, "payment_status": payment}
