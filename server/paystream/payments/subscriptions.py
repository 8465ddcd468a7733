"""Subscriptions at Stripe: creating one (POST /v1/transactions, kind subscription),
canceling one (POST /v1/transactions/{id}/cancel), and the reads of one that changes ask
for (changes/reads.py), applied through the subscription machine like a webhook.

A customer with a default card is charged at once (payment_behavior allow_incomplete:
active, or incomplete with a PaymentIntent needing 3-D Secure); one without gets an
incomplete subscription whose first invoice the page pays with the client secret
(default_incomplete), as Stripe documents for both."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse

from paystream.auth import access
from paystream.bodies import MAX_JSON_BODY, read_limited, validated
from paystream.changes import store, transitions
from paystream.changes.lifecycle import Change, stripe_now
from paystream.changes.machine_subscription import FINAL, OVERDUE
from paystream.db import ACQUIRE_TIMEOUT
from paystream.errors import ApiError
from paystream.ingest import subscriptions as meaning
from paystream.payments.stripe_api import Created, StripeApi, StripeFailure

log = logging.getLogger("paystream.subscriptions")


def _plain(obj: Any) -> dict[str, Any]:
    """stripe-python's object as the JSON an event would carry."""
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj or {})


async def _exists(api: StripeApi, what: str, read: Any, code: str, name: str) -> dict[str, Any]:
    try:
        obj = _plain(await read)
    except StripeFailure as failure:
        if failure.status == 400:  # a read by id is refused only for an id Stripe does not have
            raise ApiError(400, code, f"Stripe has no {what} {name}") from None
        raise ApiError(failure.status, failure.code, failure.message) from None
    if obj.get("deleted"):
        raise ApiError(400, code, f"the {what} {name} was deleted")
    return obj


async def priced(api: StripeApi, customer_id: str, price_id: str, quantity: int) -> tuple[int, str]:
    """Check the customer and the price before anything is stored, and what one period
    costs: an unknown customer or price, or a price that does not recur, is a 400."""
    await _exists(api, "customer", api.retrieve_customer(customer_id), "unknown_customer", customer_id)
    price = await _exists(api, "price", api.retrieve_price(price_id), "unknown_price", price_id)
    if not price.get("recurring"):
        raise ApiError(400, "price_not_recurring", f"the price {price_id} is one-off: a subscription needs a "
                       "recurring price")
    unit = price.get("unit_amount")
    if not isinstance(unit, int) or unit < 0:
        raise ApiError(400, "unknown_price", f"the price {price_id} has no unit amount")
    return unit * quantity, str(price.get("currency") or "usd").lower()


async def create_at_stripe(api: StripeApi, row: asyncpg.Record, *, customer: str, price: str, quantity: int,
                           trial_period_days: int | None, metadata: dict[str, str]) -> Created:
    cus = _plain(await api.retrieve_customer(customer))
    settings = cus.get("invoice_settings") or {}
    saved = bool(settings.get("default_payment_method") or cus.get("default_source"))
    sub = _plain(await api.create_subscription(
        row["id"], customer=customer, price=price, quantity=quantity, trial_period_days=trial_period_days,
        metadata=metadata, payment_behavior="allow_incomplete" if saved else "default_incomplete"))
    invoice = sub.get("latest_invoice") if isinstance(sub.get("latest_invoice"), dict) else {}
    secret = (invoice.get("confirmation_secret") or {}).get("client_secret")
    due = invoice.get("status") == "open" and (invoice.get("amount_due") or 0) > 0
    return Created(sub["id"], secret if due else None,
                   change=meaning.change_of(sub, stripe_now(), authoritative=True))


async def current(api: StripeApi, pool: asyncpg.Pool | asyncpg.Connection, sub_id: str) -> Change | None:
    """What Stripe says of the subscription now, with the failed renewal's error and next
    retry when it is overdue (its latest invoice's PaymentIntent's last_payment_error)."""
    sub = _plain(await api.retrieve_subscription(sub_id))
    invoice = sub.get("latest_invoice") if isinstance(sub.get("latest_invoice"), dict) else {}
    error = retry = None
    if sub.get("status") in OVERDUE:
        retry = invoice.get("next_payment_attempt")
        error = await _invoice_error(api, invoice)
    return meaning.change_of(sub, stripe_now(), error=error, next_payment_attempt=retry, authoritative=True)


async def _invoice_error(api: StripeApi, invoice: dict[str, Any]) -> dict[str, Any]:
    from paystream.ingest.stripe_events import _error_of, _invoice_payment_intents

    for pi_id in reversed(_invoice_payment_intents(invoice)):
        pi = _plain(await api.retrieve_payment_intent(pi_id))
        error = _error_of(pi.get("last_payment_error"))
        if error:
            return error
    return {"code": "invoice_payment_failed", "message": "the latest invoice's payment failed"}


async def apply_read(pool: asyncpg.Pool, api: StripeApi, job: asyncpg.Record) -> None:
    """An outbox job `read_subscription`: read and apply; done unless asked again meanwhile."""
    row = await store.get_transaction(pool, job["transaction_id"])
    assert row is not None and row["stripe_id"]
    change = await current(api, pool, row["stripe_id"])
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
        locked = await store.lock_by_id(conn, row["id"])
        if change is not None:
            await transitions.apply(conn, locked, change, stripe_event_id=None, cause_type="paystream.subscription.read")
        # A job asked for again while Stripe was being read (attempts reset) runs again.
        await conn.execute("UPDATE outbox SET done_at = clock_timestamp(), last_error = NULL"
                           " WHERE id = $1 AND attempts = $2", job["id"], job["attempts"])


class CancelRequest(BaseModel):
    model_config = {"extra": "forbid"}
    at_period_end: bool = False


async def cancel(request: Request) -> JSONResponse:
    """POST /v1/transactions/{id}/cancel for a subscription: now, or {"at_period_end":
    true} at the end of the period paid; Stripe's answer is applied and pushed (`cause.type`
    paystream.subscription.cancel).  Other kinds go to payments/operations.py."""
    from paystream.payments import operations

    access.backend(request)
    row = await store.get_transaction(request.app.state.pool, request.path_params["id"])
    if row is None or row["kind"] != "subscription":
        return await operations.cancel(request)
    api: StripeApi | None = request.app.state.stripe
    if api is None:
        raise ApiError(503, "stripe_not_configured", "STRIPE_API_KEY is not set on this server")
    req = validated(CancelRequest, await read_limited(request, MAX_JSON_BODY) or b"{}")
    if not row["stripe_id"]:
        raise ApiError(409, "not_linked", "this subscription has no Stripe object yet")
    if row["status"] in FINAL:
        raise ApiError(409, "not_cancelable", f"the subscription is {row['status']} already")
    try:
        sub = _plain(await api.cancel_subscription(row["id"], row["stripe_id"], req.at_period_end))
    except StripeFailure as failure:
        raise ApiError(failure.status if failure.status in (400, 402, 503) else 502,
                       failure.code, failure.message) from None
    change = meaning.change_of(sub, stripe_now(), authoritative=True)
    async with request.app.state.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
        locked = await store.lock_by_id(conn, row["id"])
        if change is not None:
            _, locked = await transitions.apply(conn, locked, change, stripe_event_id=None,
                                                cause_type="paystream.subscription.cancel")
    return JSONResponse({"transaction": store.render(locked)})
