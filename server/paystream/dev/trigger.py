"""Build realistic Stripe events and sign them the way Stripe does (`paystream trigger`).

Stripe signs `f"{t}.{body}"` with HMAC-SHA256 under the endpoint secret and sends
`Stripe-Signature: t=<unix time>,v1=<hex digest>`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import string
import time
from typing import Any

from paystream.ingest.stripe_events import PAYMENT_INTENT_STATUS_BY_EVENT

API_VERSION = "2025-03-31.basil"

_ALPHABET = string.ascii_letters + string.digits


def stripe_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def sign(body: str | bytes, secret: str, timestamp: int | None = None) -> str:
    raw = body.encode() if isinstance(body, str) else body
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{t}.".encode() + raw, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def envelope(event_type: str, obj: dict[str, Any], *, created: int | None = None,
             event_id: str | None = None) -> dict[str, Any]:
    return {
        "id": event_id or stripe_id("evt_"),
        "object": "event",
        "api_version": API_VERSION,
        "created": int(time.time()) if created is None else created,
        "data": {"object": obj},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": stripe_id("req_"), "idempotency_key": None},
        "type": event_type,
    }


TRIGGERABLE = (
    *PAYMENT_INTENT_STATUS_BY_EVENT,
    "charge.succeeded",
    "charge.captured",
    "charge.refunded",
    "charge.dispute.created",
    "charge.dispute.closed",
)


def payment_intent(pi_id: str, status: str, *, amount: int, currency: str = "usd",
                   customer: str | None = None, metadata: dict[str, str] | None = None,
                   capture_method: str = "automatic", declined: bool = False) -> dict[str, Any]:
    return {
        "id": pi_id,
        "object": "payment_intent",
        "amount": amount,
        "amount_capturable": amount if status == "requires_capture" else 0,
        "amount_received": amount if status == "succeeded" else 0,
        "capture_method": capture_method,
        "client_secret": f"{pi_id}_secret_{stripe_id('')[:16]}",
        "confirmation_method": "automatic",
        "created": int(time.time()),
        "currency": currency,
        "customer": customer,
        "invoice": None,
        "last_payment_error": (
            {"code": "card_declined", "decline_code": "generic_decline", "type": "card_error",
             "message": "Your card was declined."}
            if declined else None
        ),
        "latest_charge": None,
        "livemode": False,
        "metadata": metadata or {},
        "next_action": (
            {"type": "use_stripe_sdk", "use_stripe_sdk": {"type": "three_d_secure_redirect"}}
            if status == "requires_action" else None
        ),
        "payment_method": None,
        "payment_method_types": ["card"],
        "status": status,
    }


def charge(pi_id: str, *, amount: int, currency: str = "usd", captured: bool = True,
           amount_refunded: int = 0, customer: str | None = None,
           metadata: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "id": stripe_id("ch_"),
        "object": "charge",
        "amount": amount,
        "amount_captured": amount if captured else 0,
        "amount_refunded": amount_refunded,
        "captured": captured,
        "created": int(time.time()),
        "currency": currency,
        "customer": customer,
        "livemode": False,
        "metadata": metadata or {},
        "paid": True,
        "payment_intent": pi_id,
        "refunded": captured and amount_refunded >= amount,
        "status": "succeeded",
    }


def build(event_type: str, object_id: str, *, amount: int = 1500, currency: str = "usd",
          customer: str | None = None, metadata: dict[str, str] | None = None,
          amount_refunded: int | None = None, created: int | None = None,
          dispute_id: str | None = None, dispute_status: str | None = None) -> dict[str, Any]:
    """A realistic event of `event_type` about PaymentIntent `object_id`."""
    common = {"currency": currency, "customer": customer, "metadata": metadata}
    if event_type in PAYMENT_INTENT_STATUS_BY_EVENT:
        obj = payment_intent(object_id, PAYMENT_INTENT_STATUS_BY_EVENT[event_type], amount=amount,
                             declined=event_type == "payment_intent.payment_failed",
                             capture_method="manual" if event_type.endswith("capturable_updated")
                             else "automatic", **common)
    elif event_type in ("charge.succeeded", "charge.captured"):
        obj = charge(object_id, amount=amount, **common)
    elif event_type == "charge.refunded":
        refunded = amount if amount_refunded is None else amount_refunded
        obj = charge(object_id, amount=amount, amount_refunded=refunded, **common)
    elif event_type in ("charge.dispute.created", "charge.dispute.closed"):
        default = "needs_response" if event_type.endswith("created") else "won"
        obj = {"id": dispute_id or stripe_id("du_"), "object": "dispute", "amount": amount, "currency": currency,
               "charge": stripe_id("ch_"), "payment_intent": object_id, "reason": "fraudulent",
               "status": dispute_status or default, "metadata": metadata or {}}
    else:
        raise ValueError(f"cannot build {event_type!r}; choose from: {', '.join(TRIGGERABLE)}")
    return envelope(event_type, obj, created=created)


def encode(event: dict[str, Any]) -> str:
    """Stripe sends pretty-printed JSON; so do we, so bodies look like the real thing."""
    return json.dumps(event, indent=2)
