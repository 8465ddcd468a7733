"""What Stripe says about an object now, as a Change: the refresh endpoint, the sweeper
and the outbox read an object and apply its state through the same state machine and
effects as a webhook.  The change is stamped now (Stripe's whole seconds): it is the
newest knowledge there is, so a webhook about an older state that arrives later is
late news and changes nothing.  A subscription is read as its own reads are
(payments/subscriptions.current: with a failed renewal's error, and authoritative)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from paystream.changes import follows, store, transitions
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


@dataclass(frozen=True, slots=True)
class Read:
    """What a read of a transaction's Stripe object says: its change, and for a Checkout
    Session the objects it made (PaymentIntent, SetupIntent, subscription), which the
    session's transaction follows (changes/follows.py) as its webhooks would have it."""

    change: Change | None
    follows: tuple[str, ...] = ()


def _followed(obj: Any) -> tuple[str, ...]:
    if _get(obj, "object") != "checkout.session":
        return ()
    ids = (_get(obj, name) for name in checkout.FOLLOWED_FIELDS)
    ids = (value if isinstance(value, str) else _get(value, "id") for value in ids if value)
    return tuple(i for i in ids if isinstance(i, str) and i)


async def read(api: StripeApi, pool: asyncpg.Pool, stripe_id: str, at: datetime) -> Read:
    """Read the transaction's Stripe object and say what it means now.  A subscription
    (sub_) is no PaymentIntent: read as a PaymentIntent, Stripe would answer 404."""
    if stripe_id.startswith("sub_"):
        return Read(await subscriptions.current(api, pool, stripe_id))
    obj = await api.retrieve(stripe_id)
    return Read(change_from_object(obj, at), _followed(obj))


async def apply_read(conn: asyncpg.Connection, row: asyncpg.Record, what: Read,
                     cause_type: str) -> tuple[bool, asyncpg.Record | dict[str, Any]]:
    """Apply a read to its locked transaction, in the caller's database transaction: the
    change, then the follows (which may bring the session a refund its PaymentIntent had)."""
    moved = False
    if what.change is not None:
        moved, row = await transitions.apply(conn, row, what.change, stripe_event_id=None, cause_type=cause_type)
    if what.follows:
        before = row["seq"]
        await follows.record(conn, row["id"], what.follows, transitions.apply, stripe_event_id=None,
                             cause_type=cause_type)
        row = await store.lock_by_id(conn, row["id"])
        moved = moved or row["seq"] != before
    return moved, row

