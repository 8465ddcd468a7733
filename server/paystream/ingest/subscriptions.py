"""What a subscription's event (customer.subscription.*) or a read of one means: the
subscription's status as Stripe names it, and its own fields of the transaction JSON.

Pure functions over the object's JSON, as ingest/stripe_events.py is for the others;
an invoice of a subscription is interpreted there and names its subscription_id.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from paystream.changes.lifecycle import Change
from paystream.changes.machine_subscription import OVERDUE, STATUSES
from paystream.ingest import stripe_events as ev

PREFIX = "customer.subscription."

_LATEST = 2**40  # beyond any Stripe timestamp: a larger one is not a time


def _time(value: Any) -> str | None:
    """A Stripe Unix time as the contract writes times (ISO 8601, UTC); None if absent."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < _LATEST:
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return None


def _first_item(sub: dict[str, Any]) -> dict[str, Any]:
    items = sub.get("items")
    data = items.get("data") if isinstance(items, dict) else None
    return data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}


def details(sub: dict[str, Any], next_payment_attempt: Any = None) -> dict[str, Any]:
    """The subscription's fields of the transaction JSON.  Since API 2025-03-31 the period
    is its items' (`items.data[].current_period_end`); before, the subscription's own."""
    period_end = sub.get("current_period_end") or _first_item(sub).get("current_period_end")
    return {"current_period_end": _time(period_end),
            "cancel_at_period_end": sub.get("cancel_at_period_end") is True,
            "trial_end": _time(sub.get("trial_end")),
            "next_payment_attempt": _time(next_payment_attempt)}


def price_of(sub: dict[str, Any]) -> tuple[int, str]:
    """What one period costs (its first item's price times quantity) and in which currency."""
    item = _first_item(sub)
    price = item.get("price") if isinstance(item.get("price"), dict) else item.get("plan")
    price = price if isinstance(price, dict) else {}
    unit = price.get("unit_amount", price.get("amount"))
    quantity = item.get("quantity", 1)
    amount = ev._amount(unit) * (quantity if isinstance(quantity, int) and 0 < quantity < 10**6 else 1)
    return min(amount, ev._MAX_AMOUNT), ev._currency(sub.get("currency") or price.get("currency"))


def change_of(sub: dict[str, Any], at: datetime, *, error: dict[str, Any] | None = None,
              next_payment_attempt: Any = None, authoritative: bool = False) -> Change | None:
    status = ev._str(sub.get("status"))
    if status not in STATUSES:
        return None
    overdue = status in OVERDUE
    return Change(status, at, error if overdue else None,
                  details=details(sub, next_payment_attempt if overdue else None), authoritative=authoritative)


def interpret(event: dict[str, Any], obj: dict[str, Any], at: datetime) -> ev.Meaning:
    if obj.get("object") != "subscription":
        return ev.Meaning(None, None)
    meaning = ev._base(obj, obj["id"], change_of(obj, at), "subscription")
    amount, currency = price_of(obj)
    return replace(meaning, kind="subscription", amount=amount, currency=currency)


def invoice_subscription(invoice: dict[str, Any]) -> str | None:
    """The subscription an invoice bills: `subscription` before API 2025-03-31, then
    `parent.subscription_details.subscription`."""
    found = ev._id(invoice.get("subscription"))
    parent = invoice.get("parent")
    if not found and isinstance(parent, dict) and isinstance(parent.get("subscription_details"), dict):
        found = ev._id(parent["subscription_details"].get("subscription"))
    return found if found and found.startswith("sub_") else None
