"""What a Stripe event means for a transaction: which object it names and which status.

Pure functions over the event JSON: no I/O, so every mapping is unit-tested on real
fixture bodies.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from paystream.changes.lifecycle import KINDS, RANK, Change
from paystream.ingest import checkout, subscriptions

# Families whose every type we accept (store, link, maybe move); anything else is refused.
SUPPORTED_PREFIXES = ("payment_intent.", "charge.", "refund.", "invoice.", "setup_intent.", "checkout.",
                      subscriptions.PREFIX)


class MalformedEvent(ValueError):
    """A verified body that cannot be a Stripe event (answered 400, nothing stored)."""


class UnusableEvent(ValueError):
    """An event with Stripe's envelope whose fields paystream reads hold what Stripe never
    sends (a negative or non-integer amount, a NUL or a lone surrogate in metadata):
    kept for operators with outcome `invalid`, never applied, never a 500."""


# Stripe's ids and event types are short printable ASCII; the bounds keep a body that
# only looks like an event out of the database (Postgres text holds no NUL, and a lone
# surrogate cannot be encoded).
_EVENT_ID = re.compile(r"^evt_[\x21-\x7e]{1,251}$")
_OBJECT_ID = re.compile(r"^[\x21-\x7e]{1,255}$")
_EVENT_TYPE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+){1,4}$")
_API_VERSION = re.compile(r"^[0-9A-Za-z.\-_]{1,64}$")
# Stripe began in 2010; an event from further than this in the future would win every
# ordering decision against the real ones for years.
_EARLIEST = 1262304000  # 2010-01-01
_FUTURE_SLACK = 3600


@dataclass(frozen=True, slots=True)
class Meaning:
    """What one Stripe event means for a transaction: which object, and which change."""

    stripe_id: str | None  # the object our transaction is linked to (pi_…, in_…, seti_…, ch_…)
    change: Change | None  # None: the event is stored and linked but moves nothing
    # Fields for a transaction created from this event when stripe_id is new to us.
    amount: int = 0
    currency: str = "usd"
    customer_id: str | None = None
    kind: str = "payment"
    metadata: dict[str, Any] = field(default_factory=dict)
    # Other Stripe objects that speak for the same transaction (an invoice's PaymentIntents).
    links: tuple[str, ...] = ()
    # `amount` is the linked object's own (the event is about the PaymentIntent or
    # invoice itself, not a charge, refund or dispute of it).
    target_amount: bool = False
    # Objects whose own transactions this one follows without speaking for them (a
    # Checkout Session's PaymentIntent): see changes/follows.py.
    follows: tuple[str, ...] = ()
    # Refund objects the event carries (a refund's own events, a charge's refunds list):
    # {id, amount, status, reason, failure_reason, paystream_refund_id} (changes/refunds.py).
    refunds: tuple[dict[str, Any], ...] = ()

    @property
    def transaction_ref(self) -> str | None:
        """Our own transaction id, when our API created the Stripe object."""
        ref = self.metadata.get("transaction_id")
        return ref if isinstance(ref, str) and ref.startswith("txn_") else None


def is_supported(event_type: str) -> bool:
    return event_type.startswith(SUPPORTED_PREFIXES)


def check_envelope(event: Any) -> None:
    """Raise MalformedEvent unless `event` has the envelope every Stripe event has."""
    if not isinstance(event, dict):
        raise MalformedEvent("the body is not a JSON object")
    if not isinstance(event.get("id"), str) or not _EVENT_ID.match(event["id"]):
        raise MalformedEvent("`id` must be a Stripe event id (evt_ and up to 251 printable ASCII characters)")
    if not isinstance(event.get("type"), str) or not _EVENT_TYPE.match(event["type"]):
        raise MalformedEvent("`type` must be a Stripe event type such as payment_intent.succeeded")
    created = event.get("created")
    if (not isinstance(created, int) or isinstance(created, bool)
            or not _EARLIEST <= created <= time.time() + _FUTURE_SLACK):
        raise MalformedEvent("`created` must be a Unix timestamp between 2010 and now")
    data = event.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise MalformedEvent("`data.object` is missing")
    object_id = data["object"].get("id")
    if not isinstance(object_id, str) or not _OBJECT_ID.match(object_id):
        raise MalformedEvent("`data.object.id` must be an id of up to 255 printable ASCII characters")
    version = event.get("api_version")
    if version is not None and not (isinstance(version, str) and _API_VERSION.match(version)):
        raise MalformedEvent("`api_version` must be a Stripe API version")


def event_time(event: dict[str, Any]) -> datetime:
    return datetime.fromtimestamp(event["created"], tz=UTC)


# Readers that take a field as Stripe documents it or not at all: a verified body is
# still data, and odd data must not become a crash (a 500 instead of a precise answer).
_MAX_AMOUNT = 2**63 - 1


def _str(value: Any, where: str = "a text field") -> str | None:
    """A non-empty string, checked as every string stored from an event is (_storable)."""
    return _storable(value, where) if isinstance(value, str) and value else None


def _amount(value: Any, name: str = "amount") -> int:
    """An amount in the smallest unit: absent is 0; anything but a whole number from 0 to
    2^63 - 1 (negative, huge, NaN, 1e400, text) makes the event unusable."""
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_AMOUNT:
        return value
    raise UnusableEvent(f"`{name}` is {str(value)[:40]!r}, not a whole number of the smallest unit")


# How deep a JSON value stored from an event (metadata, errors, disputes) may nest: Stripe's
# own are at most a few levels, and the response encoder must be able to write back every
# stored value (a 970-deep metadata once made GET of its transaction answer 500 forever).
MAX_DEPTH = 32


def _storable(value: Any, where: str, depth: int = 0) -> Any:
    """`value` if Postgres can store it as JSON text (no NUL, no lone surrogate) and it
    nests at most MAX_DEPTH deep, else UnusableEvent naming where."""
    if isinstance(value, str):
        if "\x00" in value or not value.isascii() and _has_surrogate(value):
            raise UnusableEvent(f"{where} holds a NUL or a lone surrogate")
    elif isinstance(value, (dict, list)) and depth >= MAX_DEPTH:
        raise UnusableEvent(f"{where} nests deeper than {MAX_DEPTH} levels")
    elif isinstance(value, dict):
        for key, item in value.items():
            _storable(key, where, depth + 1)
            _storable(item, where, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _storable(item, where, depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise UnusableEvent(f"{where} holds a number JSON cannot carry")
    return value


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _currency(value: Any) -> str:
    """ISO 4217, lower case as Stripe sends it; XXX ('no currency') for anything else."""
    if isinstance(value, str) and len(value) == 3 and value.isascii() and value.isalpha():
        return value.lower()
    return "xxx"


def _error_of(obj: Any) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or not obj:
        return None
    err = {k: obj[k][:500] for k in ("code", "decline_code", "message", "type") if _str(obj.get(k))}
    return _storable(err, "`last_payment_error`") or {"code": "payment_failed"}


def _id(value: Any) -> str | None:
    """Stripe expands some references into objects; accept both shapes."""
    if isinstance(value, dict):
        value = value.get("id")
    return _str(value)


def _kind(obj: dict[str, Any], default: str) -> str:
    meta = obj.get("metadata") or {}
    kind = _str(meta.get("paystream_kind")) if isinstance(meta, dict) else None
    return kind if kind in KINDS else default


def _base(obj: dict[str, Any], stripe_id: str | None, change: Change | None, kind: str,
          links: tuple[str, ...] = ()) -> Meaning:
    meta = _storable(obj.get("metadata"), "`metadata`")
    customer = _storable(_id(obj.get("customer")), "`customer`")
    if stripe_id is not None:
        _storable(stripe_id, "the object's id")
    return Meaning(
        stripe_id=stripe_id,
        change=change,
        amount=_amount(obj.get("amount", obj.get("amount_due", 0))),
        currency=_currency(obj.get("currency")),
        customer_id=customer if customer is None or len(customer) <= 255 else None,
        kind=_kind(obj, kind),
        metadata=dict(meta) if isinstance(meta, dict) else {},
        links=tuple(_storable(link, "a linked id") for link in links),
        target_amount=obj.get("id") == stripe_id and obj.get("object") in ("payment_intent", "invoice"),
    )


# The status a PaymentIntent has in each of its events' data.object (`paystream trigger`
# builds its objects from this too).  payment_intent.created carries whatever status
# the object was created with: the object's own field is read for it.
PAYMENT_INTENT_STATUS_BY_EVENT = {
    "payment_intent.created": "requires_payment_method",
    "payment_intent.processing": "processing",
    "payment_intent.requires_action": "requires_action",
    "payment_intent.amount_capturable_updated": "requires_capture",
    "payment_intent.succeeded": "succeeded",
    "payment_intent.payment_failed": "requires_payment_method",
    "payment_intent.canceled": "canceled",
}


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _multicapture(charge: Any) -> bool:
    """A charge of a multicapture payment that may still be captured again: what it has
    taken so far is not what it will take."""
    details = _field(charge, "payment_method_details")
    card = _field(details, "card") if details is not None else None
    multi = _field(card, "multicapture") if card is not None else None
    return multi is not None and _field(multi, "status") == "available"


def amount_captured(obj: Any) -> int | None:
    """What Stripe took of a captured PaymentIntent (its `amount_received`, else its
    expanded `latest_charge`'s `amount_captured`) or charge (its `amount_captured`); None
    when the object does not say, or while a multicapture payment may take more.  A partial
    capture (made here or in the Dashboard) took less than the amount: the rest of the
    authorisation was released, not refunded."""
    if _multicapture(obj):
        return None
    for value in (_field(obj, "amount_received"), _field(obj, "amount_captured")):
        if type(value) is int and value > 0:
            return value
    charge = _field(obj, "latest_charge")
    return amount_captured(charge) if charge is not None and not isinstance(charge, str) else None


def _payment_intent(event: dict[str, Any], obj: dict[str, Any], at: datetime) -> Meaning:
    etype = event["type"]
    if etype == "payment_intent.created":
        status = _str(obj.get("status"))
        change = Change(status, at) if status in RANK else None
    else:  # partially_funded and friends are stored and linked, with no status of ours
        change = _intent_change(etype, obj, at, PAYMENT_INTENT_STATUS_BY_EVENT, "payment_intent.payment_failed",
                                "last_payment_error", "payment_failed")
        if change is not None and change.status == "succeeded":
            change = replace(change, amount_captured=amount_captured(obj))
    invoice = _id(obj.get("invoice"))  # before API 2025-03-31 a PI names its invoice
    if invoice:
        return _base(obj, invoice, change, "invoice", links=(obj["id"],))
    return _base(obj, obj["id"], change, "payment")


def _charge(event: dict[str, Any], obj: dict[str, Any], at: datetime) -> Meaning:
    etype = event["type"]
    target = _id(obj.get("payment_intent")) or obj["id"]
    change: Change | None = None
    captured = bool(obj.get("captured"))
    if etype in ("charge.succeeded", "charge.captured"):
        # From API 2024-04-10 capture may be async: charge.succeeded is the money moving.
        change = Change("succeeded", at, amount_captured=amount_captured(obj)) if captured else Change(
            "requires_capture", at)
    elif etype == "charge.refunded" and captured:
        # An uncaptured charge "refunded" is Stripe releasing a canceled authorization:
        # not a refund of ours, so it moves nothing (the PI's canceled event does).
        amount, refunded = _amount(obj.get("amount")), _amount(obj.get("amount_refunded"), "amount_refunded")
        if refunded > amount:
            raise UnusableEvent(f"`amount_refunded` {refunded} is more than the charge's `amount` {amount}")
        taken = amount_captured(obj)
        if taken is not None and refunded > taken:
            raise UnusableEvent(f"`amount_refunded` {refunded} is more than the charge's `amount_captured` {taken}")
        full = obj.get("refunded") is True or (amount > 0 and refunded >= amount)
        change = Change("refunded" if full else "partially_refunded", at, amount_refunded=refunded,
                        amount_captured=taken)
    elif etype == "charge.refund.updated" and obj.get("status") == "failed":
        change = _refund_failure(obj, at)
    elif etype == "charge.expired":
        change = Change("canceled", at)
    elif etype.startswith("charge.dispute."):
        target = _id(obj.get("payment_intent")) or _id(obj.get("charge")) or obj["id"]
        # Every dispute event carries the dispute: its stage decides (lifecycle.decide).
        dispute = {"id": obj["id"], "amount": _amount(obj.get("amount")), "currency": _currency(obj.get("currency")),
                   "status": _storable(_str(obj.get("status")), "the dispute's status")}
        change = Change("disputed", at, dispute=dispute)
    # charge.failed is reported by payment_intent.payment_failed with the PI's own error.
    meaning = _base(obj, target, change, "payment")
    if etype == "charge.refund.updated":
        return replace(meaning, refunds=_refunds_of(obj))
    if etype == "charge.refunded":
        listed = obj.get("refunds")  # expanded by default before API 2022-11-15
        items = listed.get("data") if isinstance(listed, dict) else None
        return replace(meaning, refunds=tuple(r for item in (items if isinstance(items, list) else [])
                                              for r in _refunds_of(item)))
    return meaning


_REFUND_STATUSES = ("pending", "requires_action", "succeeded", "failed", "canceled")


def _refunds_of(obj: Any) -> tuple[dict[str, Any], ...]:
    """The refund `obj` as changes/refunds.py records it; () if it is not one."""
    if not isinstance(obj, dict) or obj.get("object") != "refund":
        return ()
    refund_id, status = _str(obj.get("id"), "the refund's id"), _str(obj.get("status"), "the refund's status")
    if not refund_id or not refund_id.startswith("re_") or status not in _REFUND_STATUSES:
        return ()
    meta = obj.get("metadata")
    ours = _str(meta.get("paystream_refund_id"), "the refund's metadata") if isinstance(meta, dict) else None
    return ({"id": refund_id, "amount": _amount(obj.get("amount")), "status": status,
             "reason": _str(obj.get("reason"), "the refund's reason"),
             "failure_reason": _str(obj.get("failure_reason"), "the refund's failure_reason"),
             "paystream_refund_id": ours},)


def _refund_failure(refund: dict[str, Any], at: datetime) -> Change:
    error = {"code": "refund_failed", "refund": _str(refund.get("id")),
             "failure_reason": _str(refund.get("failure_reason"))}
    return Change("succeeded", at, refund_error=error)  # status is kept; see lifecycle.decide


def _refund(event: dict[str, Any], obj: dict[str, Any], at: datetime) -> Meaning:
    target = _id(obj.get("payment_intent")) or _id(obj.get("charge")) or obj["id"]
    failed = event["type"] == "refund.failed" or obj.get("status") == "failed"
    return replace(_base(obj, target, _refund_failure(obj, at) if failed else None, "payment"),
                   refunds=_refunds_of(obj))


def _invoice_payment_intents(invoice: dict[str, Any]) -> tuple[str, ...]:
    """An invoice's PaymentIntents: `payment_intent` before API 2025-03-31, then
    `payments.data[].payment.payment_intent` (invoice_payments)."""
    found = []
    if pi := _id(invoice.get("payment_intent")):
        found.append(pi)
    payments = invoice.get("payments")
    if isinstance(payments, dict):
        for item in payments.get("data") or []:
            payment = item.get("payment") if isinstance(item, dict) else None
            if isinstance(payment, dict) and (pi := _id(payment.get("payment_intent"))):
                found.append(pi)
    return tuple(dict.fromkeys(found))


def _invoice(event: dict[str, Any], obj: dict[str, Any], at: datetime) -> Meaning:
    etype = event["type"]
    change: Change | None = None
    if etype in ("invoice.paid", "invoice.payment_succeeded"):
        change = Change("succeeded", at)
    elif etype == "invoice.payment_failed":
        change = Change("requires_payment_method", at, {"code": "invoice_payment_failed"})
    elif etype == "invoice.payment_action_required":
        change = Change("requires_action", at)
    elif etype == "invoice.voided":
        change = Change("canceled", at)
    meaning = _base(obj, obj["id"], change, "invoice", links=_invoice_payment_intents(obj))
    subscription = subscriptions.invoice_subscription(obj)
    if subscription and change is not None:
        meaning = replace(meaning, change=replace(change, details={"subscription_id": subscription}))
    paid = _amount(obj.get("amount_paid"), "amount_paid") or _amount(obj.get("amount_due"), "amount_due")
    if paid > 0:
        meaning = replace(meaning, amount=paid)
    return meaning


_SETUP_STATUS = {
    "setup_intent.created": "requires_payment_method",
    "setup_intent.requires_action": "requires_action",
    "setup_intent.succeeded": "succeeded",
    "setup_intent.canceled": "canceled",
}


def _setup_intent(event: dict[str, Any], obj: dict[str, Any], at: datetime) -> Meaning:
    change = _intent_change(event["type"], obj, at, _SETUP_STATUS, "setup_intent.setup_failed",
                            "last_setup_error", "setup_failed")
    return _base(obj, obj["id"], change, "card_validation")


def _intent_change(etype: str, obj: dict[str, Any], at: datetime, statuses: dict[str, str], failed: str,
                   error_field: str, error_code: str) -> Change | None:
    """A Payment- or SetupIntent event's change: its failure is a decline back to
    requires_payment_method with the intent's own error; the rest map to a status."""
    if etype == failed:
        return Change("requires_payment_method", at, _error_of(obj.get(error_field)) or {"code": error_code})
    status = statuses.get(etype)
    return Change(status, at) if status else None


def _checkout_session(event: dict[str, Any], obj: dict[str, Any], at: datetime) -> Meaning:
    meaning = _base(obj, obj["id"], checkout.change_of(event["type"], obj, at), "checkout")
    followed = (_id(obj.get(name)) for name in checkout.FOLLOWED_FIELDS)
    return replace(meaning, amount=_amount(obj.get("amount_total"), "amount_total"),
                   follows=tuple(_storable(i, "a followed id") for i in followed if i))


def interpret(event: dict[str, Any]) -> Meaning:
    """What this (envelope-checked, supported) event does."""
    obj = event["data"]["object"]
    at = event_time(event)
    etype = event["type"]
    if etype.startswith("payment_intent."):
        return _payment_intent(event, obj, at)
    if etype.startswith("charge."):
        return _charge(event, obj, at)
    if etype.startswith("refund."):
        return _refund(event, obj, at)
    if etype.startswith("invoice."):
        return _invoice(event, obj, at)
    if etype.startswith(subscriptions.PREFIX):
        return subscriptions.interpret(event, obj, at)
    if etype.startswith("checkout."):
        return _checkout_session(event, obj, at) if obj.get("object") == "checkout.session" else Meaning(None, None)
    return _setup_intent(event, obj, at)
