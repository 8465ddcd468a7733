"""POST /v1/transactions: our row first, then the Stripe object, then the link.

The row is committed before Stripe is called, so an event Stripe sends about the new
object always finds it (by the transaction_id in the object's metadata).  Stripe's own
idempotency key is derived from our transaction id, and Idempotency-Key on our endpoint
returns the first answer again, so a retried request never makes a second object.

Requests with one Idempotency-Key that arrive together: one of them claims the key (a
committed claim in its idempotency_keys row, renewed while it calls Stripe, so no database
transaction or session lock is held across the call and a transaction-mode pooler is fine)
and calls Stripe; the others poll the row for its answer and give that same answer, or
after IDEMPOTENCY_WAIT answer 409 idempotency_key_in_flight with Retry-After.  A claim
whose holder died lapses after CLAIM_LEASE, and the next request with the key takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import secrets
import time
from datetime import timedelta
from typing import Any, Literal

import asyncpg
from pydantic import BaseModel, Field, PrivateAttr, field_validator
from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import JSONResponse

from paystream.auth import access, tokens
from paystream.bodies import MAX_JSON_BODY, read_limited, stripe_metadata, validated
from paystream.changes import store, transitions
from paystream.changes.lifecycle import BEFORE_STRIPE, KINDS, Change, stripe_now
from paystream.db import ACQUIRE_TIMEOUT
from paystream.errors import ApiError
from paystream.payments import subscriptions
from paystream.payments.current import change_from_payment_intent
from paystream.payments.stripe_api import Created, StripeApi, StripeFailure

CARD_VALIDATION_AMOUNT = 100  # $1, authorised then released
# A held authorisation's days (authorization_days); payments/recovery.py expires it after them.
DEFAULT_AUTHORIZATION_DAYS, MIN_AUTHORIZATION_DAYS, MAX_AUTHORIZATION_DAYS = 7, 1, 31
AUTHORIZABLE_KINDS = ("payment", "wallet_top_up")  # kinds that may hold a manual-capture authorisation

# How long a request waits for another request holding its Idempotency-Key: far above a
# Stripe create's usual second, below a client's usual timeout.
IDEMPOTENCY_WAIT = 5.0
# A claim lapses this long after its last renewal; the holder renews it every third of it
# while it calls Stripe (whose calls, with stripe-python's retries, can outlast any fixed
# lease), so only a dead holder's claim lapses.
CLAIM_LEASE = timedelta(seconds=30)
_POLL_FIRST, _POLL_MAX = 0.02, 0.25  # seconds between looks at a held key's row


class CreateTransaction(BaseModel):
    model_config = {"extra": "forbid"}
    kind: Literal[KINDS]  # type: ignore[valid-type]  # the tuple spells out the Literal
    amount: int | None = Field(default=None, gt=0, le=99_999_999)
    currency: str = Field(default="usd", pattern=r"^[a-zA-Z]{3}$")
    customer_id: str | None = Field(default=None, min_length=1, max_length=255)
    capture_method: Literal["automatic", "manual"] | None = None
    metadata: dict[str, str] = Field(default_factory=dict, max_length=40)
    coupon: str | None = Field(default=None, min_length=1, max_length=255)  # invoices only
    # An invoice's price after its coupon (_priced_invoice): the transaction's amount, while
    # `amount` is what the invoice adds to the customer's wallet once paid.
    _invoice_due: int | None = PrivateAttr(default=None)
    # Checkout Sessions only (kind "checkout"): see _checked_checkout.
    mode: Literal["payment", "subscription", "setup"] | None = None
    success_url: str | None = Field(default=None, min_length=1, max_length=2048)
    cancel_url: str | None = Field(default=None, min_length=1, max_length=2048)
    price: str | None = Field(default=None, min_length=1, max_length=255)
    # Subscriptions only (kind "subscription", with customer_id and price).
    quantity: int | None = Field(default=None, gt=0, le=10_000)
    trial_period_days: int | None = Field(default=None, gt=0, le=730)  # Stripe's own bound
    # Saved cards (see _check_saved_card): keep the card this payment uses, or charge one
    # the customer saved, from the backend, without them.
    setup_future_usage: Literal["on_session", "off_session"] | None = None
    payment_method: str | None = Field(default=None, pattern=r"^pm_[0-9A-Za-z_]{1,250}$")
    off_session: bool | None = None
    confirm: bool | None = None
    # A manual-capture payment: days its authorisation is held before paystream releases
    # it (see _check_authorization_days).  Strict: true or "7" is not a number of days.
    authorization_days: int | None = Field(default=None, strict=True)

    @field_validator("customer_id", "coupon", "success_url", "cancel_url", "price")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str]) -> dict[str, str]:
        return stripe_metadata(value, reserved=("transaction_id", "paystream_kind"))

    def checked(self) -> CreateTransaction:
        """The rules across fields, common ones first (a kind never skips them)."""
        if self.coupon and self.kind != "invoice":
            raise ApiError(400, "bad_request", "coupon applies to invoices only")
        if self.kind != "checkout" and (self.mode or self.success_url or self.cancel_url):
            raise ApiError(400, "bad_request", "mode, success_url and cancel_url apply to checkout only")
        req = self.model_copy(update={"currency": self.currency.lower()})
        _check_saved_card(req)
        _check_authorization_days(req)
        if req.kind == "checkout":
            return _checked_checkout(req)
        if req.kind != "subscription" and (req.quantity or req.trial_period_days):
            raise ApiError(400, "bad_request", "quantity and trial_period_days apply to subscriptions only")
        if req.kind == "subscription":
            if not req.customer_id or not req.price or req.amount is not None or req.capture_method:
                raise ApiError(400, "bad_request", "a subscription needs customer_id and price (no amount or "
                               "capture_method: the price sets what each period costs)")
            return req.model_copy(update={"quantity": req.quantity or 1})
        if req.kind == "card_validation":
            if req.amount not in (None, CARD_VALIDATION_AMOUNT) or req.capture_method == "automatic":
                raise ApiError(400, "bad_request", "a card validation is a $1 (amount 100) manual capture")
            return req.model_copy(update={"amount": CARD_VALIDATION_AMOUNT, "capture_method": "manual"})
        if req.amount is None:
            raise ApiError(400, "bad_request", "amount is required")
        if req.kind in ("wallet_top_up", "invoice") and not req.customer_id:
            raise ApiError(400, "bad_request", f"a {req.kind} needs customer_id")
        return req


def _checked_checkout(req: CreateTransaction) -> CreateTransaction:
    """A Checkout Session: a mode, where the customer goes after it (success_url may
    carry Stripe's {CHECKOUT_SESSION_ID}), and what it sells: one `price`, or `amount` in
    `currency`, in payment mode; a recurring `price` in subscription mode; nothing in
    setup mode (Stripe refuses a price of the wrong kind for the mode: 400)."""
    if req.mode is None:
        raise ApiError(400, "bad_request", "a checkout needs mode: payment, subscription or setup")
    for name in ("success_url", "cancel_url"):
        url = getattr(req, name)
        if url is None:
            raise ApiError(400, "bad_request", f"a checkout needs {name}")
        if not url.startswith(("https://", "http://")) or any(c in url for c in " \t\r\n"):
            raise ApiError(400, "bad_request", f"{name} must be an absolute http(s) URL")
    if req.capture_method is not None:
        raise ApiError(400, "bad_request", "capture_method does not apply to a checkout")
    if req.mode == "payment" and (req.amount is None) == (req.price is None):
        raise ApiError(400, "bad_request", "a payment-mode checkout needs either amount (and currency) or price")
    if req.mode == "subscription" and (req.price is None or req.amount is not None):
        raise ApiError(400, "bad_request", "a subscription-mode checkout needs a recurring price and no amount")
    if req.mode == "setup" and (req.price is not None or req.amount is not None):
        raise ApiError(400, "bad_request", "a setup-mode checkout takes no amount or price")
    return req


def _check_saved_card(req: CreateTransaction) -> None:
    """setup_future_usage keeps the card of a payment or card validation for its customer;
    payment_method with off_session and confirm both true charges one the customer saved."""
    if req.setup_future_usage:
        if req.kind not in ("payment", "card_validation") or not req.customer_id:
            raise ApiError(400, "bad_request", "setup_future_usage keeps a payment's or card validation's card "
                           "for its customer: it needs customer_id")
        if req.payment_method or req.off_session or req.confirm:
            raise ApiError(400, "bad_request", "setup_future_usage is for a card the customer enters now, "
                           "not with payment_method, off_session or confirm")
    if req.payment_method or req.off_session is not None or req.confirm is not None:
        if not (req.kind == "payment" and req.payment_method and req.off_session and req.confirm
                and req.customer_id):
            raise ApiError(400, "bad_request", "charging a saved card takes kind payment, customer_id, "
                           "payment_method, off_session: true and confirm: true")
        if req.capture_method == "manual":
            raise ApiError(400, "bad_request", "a saved card is charged with automatic capture")


def _check_authorization_days(req: CreateTransaction) -> None:
    """authorization_days: how long paystream holds a manual-capture payment's authorisation
    before it releases it (the sweeper's expiry), 1 to 31; card networks let lodging and
    similar merchants hold one up to 31 days, most others 7, the default."""
    if req.authorization_days is None:
        return
    if req.capture_method != "manual" or req.kind not in AUTHORIZABLE_KINDS:
        raise ApiError(400, "bad_request", "authorization_days applies to a payment or wallet_top_up with "
                       "capture_method \"manual\" (an authorisation held until captured)")
    if not MIN_AUTHORIZATION_DAYS <= req.authorization_days <= MAX_AUTHORIZATION_DAYS:
        raise ApiError(400, "bad_request", f"authorization_days must be from {MIN_AUTHORIZATION_DAYS} to "
                       f"{MAX_AUTHORIZATION_DAYS} (days an uncaptured authorisation is held; up to 31 for "
                       f"lodging, as card networks allow), not {req.authorization_days}")


async def _check_card_is_customers(api: StripeApi, req: CreateTransaction) -> None:
    """Refuse, before anything is stored, a payment_method that is not one of this
    customer's saved cards (unknown to Stripe, or another customer's)."""
    refusal = ApiError(400, "payment_method_not_attached",
                       f"{req.payment_method} is not a card saved for customer {req.customer_id}")
    try:
        pm = await api.retrieve_payment_method(req.payment_method or "")
    except StripeFailure as failure:
        if failure.status == 400:  # Stripe does not know it
            raise refusal from None
        raise ApiError(failure.status, failure.code, failure.message, headers=failure.headers) from None
    customer = getattr(pm, "customer", None)
    if (customer if isinstance(customer, str) else getattr(customer, "id", None)) != req.customer_id:
        raise refusal


def _parse(raw: bytes) -> CreateTransaction:
    return validated(CreateTransaction, raw).checked()


class _Answered(Exception):
    """The key already has its answer (final, or a 5xx a waiter was waiting for)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status, self.body = status, body


async def _claim_key(conn: asyncpg.Connection, key: str, digest: str, claim: str) -> asyncpg.Record | None:
    """Claim the key for this request and return its row (locked until this database
    transaction ends), or None while another request holds it.  Raises _Answered when it
    has a final answer."""
    inserted = await conn.fetchrow(
        """INSERT INTO idempotency_keys (key, request_hash, claim, claimed_until)
           VALUES ($1, $2, $3, clock_timestamp() + $4::interval)
           ON CONFLICT DO NOTHING RETURNING *""", key, digest, claim, CLAIM_LEASE)
    if inserted is not None:
        return inserted
    earlier = await conn.fetchrow(
        "SELECT *, claimed_until > clock_timestamp() AS held FROM idempotency_keys WHERE key = $1 FOR UPDATE", key)
    if earlier["request_hash"] != digest:
        raise ApiError(400, "idempotency_key_reused", "this Idempotency-Key was used with a different body")
    if earlier["response"] is not None and earlier["status_code"] < 500:
        raise _Answered(earlier["status_code"], earlier["response"])
    if earlier["held"]:
        return None
    # Free: a first attempt that ended in a 5xx, or whose holder died.  This request retries.
    return await conn.fetchrow(
        """UPDATE idempotency_keys SET claim = $2, claimed_until = clock_timestamp() + $3::interval,
                  status_code = NULL, response = NULL
            WHERE key = $1 RETURNING *""", key, claim, CLAIM_LEASE)


async def _await_holder(pool: asyncpg.Pool, key: str, deadline: float) -> None:
    """Wait while another request holds the key.  Raises _Answered with its answer; returns
    when the key is free without one (its holder failed unexpectedly or died), so that this
    request claims it; 409 at the deadline."""
    pause = _POLL_FIRST
    while True:
        row = await pool.fetchrow(
            """SELECT status_code, response, claimed_until > clock_timestamp() AS held,
                      extract(epoch FROM claimed_until - clock_timestamp()) AS left
                 FROM idempotency_keys WHERE key = $1""", key)
        if row is None or not row["held"] and row["response"] is None:
            return
        if row["response"] is not None:
            raise _Answered(row["status_code"], row["response"])
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            # Retry-After: when another wait is worth it, not when the claim would lapse
            # (a live holder keeps renewing it).
            retry = max(1, math.ceil(min(float(row["left"]), IDEMPOTENCY_WAIT)))
            raise ApiError(409, "idempotency_key_in_flight",
                           "a request with this Idempotency-Key is still being processed; retry later",
                           headers={"Retry-After": str(retry)})
        await asyncio.sleep(min(pause, remaining))
        pause = min(pause * 2, _POLL_MAX)


async def _renew_claim(pool: asyncpg.Pool, key: str, claim: str) -> None:
    every = CLAIM_LEASE.total_seconds() / 3
    while True:
        await asyncio.sleep(every)
        with contextlib.suppress(asyncpg.PostgresError, OSError, TimeoutError):
            await pool.execute(
                "UPDATE idempotency_keys SET claimed_until = clock_timestamp() + $3::interval"
                " WHERE key = $1 AND claim = $2", key, claim, CLAIM_LEASE)


async def _answer(conn: asyncpg.Connection | asyncpg.Pool, key: str | None, claim: str, status: int,
                  body: dict) -> None:
    """Record this request's answer for its key and give the key up (if still ours: a claim
    that lapsed may have passed to another request).  A 5xx answer is given to the requests
    waiting on this one, and a later request retries."""
    if key:
        await conn.execute(
            """UPDATE idempotency_keys SET status_code = $2, response = $3,
                      claimed_until = CASE WHEN claim = $4 THEN NULL ELSE claimed_until END,
                      claim = CASE WHEN claim = $4 THEN NULL ELSE claim END
                WHERE key = $1""", key, status, json.loads(json.dumps(body)), claim)


async def _give_up(pool: asyncpg.Pool, key: str, claim: str) -> None:
    """Free the key without an answer (an unexpected failure): a waiter or retry takes over."""
    with contextlib.suppress(asyncpg.PostgresError, OSError, TimeoutError):
        await pool.execute("UPDATE idempotency_keys SET claim = NULL, claimed_until = NULL"
                           " WHERE key = $1 AND claim = $2", key, claim)


async def create_transaction(request: Request) -> JSONResponse:
    access.backend(request)
    raw = await read_limited(request, MAX_JSON_BODY)
    key = request.headers.get("idempotency-key")
    if key is not None and (not 1 <= len(key) <= 255 or "\x00" in key):
        raise ApiError(400, "bad_request", "Idempotency-Key must be 1 to 255 characters")
    status, body = await create(request.app.state, raw, key)
    headers = None
    if status == 503 and request.app.state.stripe is not None:  # Stripe unavailable: when to come back
        headers = {"Retry-After": str(max(1, math.ceil(request.app.state.stripe.breaker.retry_after())))}
    return JSONResponse(body, status_code=status, headers=headers)


async def create(state: State, raw: bytes, key: str | None) -> tuple[int, dict[str, Any]]:
    """Create a transaction from a request body; the HTTP status and body to answer."""
    api: StripeApi | None = state.stripe
    if api is None:
        raise ApiError(503, "stripe_not_configured", "STRIPE_API_KEY is not set on this server")
    req = _parse(raw)
    if req.kind == "subscription":  # an unknown customer or price is refused before anything is stored
        assert req.customer_id and req.price and req.quantity
        amount, currency = await subscriptions.priced(api, req.customer_id, req.price, req.quantity)
        req = req.model_copy(update={"amount": amount, "currency": currency})
    if req.kind == "invoice":  # an unknown customer or coupon is refused before anything is stored
        req._invoice_due = await _priced_invoice(api, req)
    if req.payment_method:
        await _check_card_is_customers(api, req)
    if api.breaker.state == "open" and api.breaker.retry_after() > 0:
        # Fail fast, before a transaction is written for a call that will not be made.
        raise ApiError(503, "stripe_unavailable", "Stripe is unavailable (circuit breaker open); try again later",
                       {"Retry-After": str(max(1, math.ceil(api.breaker.retry_after())))})
    pool: asyncpg.Pool = state.pool
    if key is None:
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
            row = await _start(conn, req, None)
        return await _call_stripe(state, api, req, row, None, "")

    digest, claim = hashlib.sha256(raw).hexdigest(), secrets.token_hex(16)
    deadline = time.monotonic() + IDEMPOTENCY_WAIT
    try:
        while True:
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
                held = await _claim_key(conn, key, digest, claim)
                if held is not None:
                    row = await _start(conn, req, held)
                    if held["transaction_id"] is None:
                        await conn.execute("UPDATE idempotency_keys SET transaction_id = $2 WHERE key = $1",
                                           key, row["id"])
                    break
            await _await_holder(pool, key, deadline)
    except _Answered as answered:
        return answered.status, answered.body

    renewal = asyncio.create_task(_renew_claim(pool, key, claim))
    try:
        return await _call_stripe(state, api, req, row, key, claim)
    except BaseException:
        await asyncio.shield(_give_up(pool, key, claim))
        raise
    finally:
        renewal.cancel()


async def _start(conn: asyncpg.Connection, req: CreateTransaction,
                 key_row: asyncpg.Record | None) -> asyncpg.Record:
    """The transaction to create at Stripe: the key's from an earlier attempt, else a new
    one (committed, with the claim, before Stripe is called)."""
    if key_row is not None and key_row["transaction_id"] is not None:
        row = await store.lock_by_id(conn, key_row["transaction_id"])  # a retry after a 5xx
        assert row is not None
        return row
    txn_id = store.new_transaction_id()
    await transitions.lock_for_writing(conn, txn_id)
    row = await transitions.create(
        conn, txn_id=txn_id, stripe_id=None, kind=req.kind, amount=req.amount or 0,
        currency=req.currency, customer_id=req.customer_id, metadata=req.metadata,
        change=Change("incomplete" if req.kind == "subscription" else "requires_payment_method", BEFORE_STRIPE),
        stripe_event_id=None, cause_type="paystream.transaction.created")
    if req.capture_method == "manual" and req.kind in AUTHORIZABLE_KINDS:
        days = req.authorization_days or DEFAULT_AUTHORIZATION_DAYS
        await conn.execute("UPDATE transactions SET authorization_days = $2 WHERE id = $1", txn_id, days)
    if req.kind == "invoice":  # pays its price after the coupon; adds `amount` to the wallet once paid
        await conn.execute("UPDATE transactions SET amount = $2, details = $3 WHERE id = $1", txn_id,
                           req._invoice_due if req._invoice_due is not None else req.amount,
                           {"amount_added": req.amount})
    await transitions.unpark(conn, txn_id)
    return row


async def _call_stripe(state: State, api: StripeApi, req: CreateTransaction, row: asyncpg.Record,
                       key: str | None, claim: str) -> tuple[int, dict[str, Any]]:
    pool: asyncpg.Pool = state.pool
    txn_id = row["id"]
    try:
        created = await _create_at_stripe(api, row, req)
    except StripeFailure as failure:
        await _record_failure(pool, txn_id, failure)
        body = {"error": failure.as_error() | {"transaction_id": txn_id}}
        await _answer(pool, key, claim, failure.status, body)  # below 500 final: the same answer again
        return failure.status, body

    async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
        await transitions.lock_for_writing(conn, txn_id)
        await store.set_stripe_id(conn, txn_id, created.stripe_id)
        for linked in created.links:
            await store.link(conn, linked, txn_id)
        if created.amount is not None:  # a session priced by Stripe: its total is known now
            await conn.execute("UPDATE transactions SET amount = $2, currency = $3 WHERE id = $1",
                               txn_id, created.amount, created.currency or row["currency"])
        if created.change is not None:  # the object as Stripe answered (a subscription: active, incomplete)
            locked = await store.lock_by_id(conn, txn_id)
            await transitions.apply(conn, locked, created.change, stripe_event_id=None,
                                    cause_type=f"paystream.{row['kind']}.created")
        row = await store.get_transaction(conn, txn_id)
        token, _ = tokens.mint(state.settings.paystream_token_secret,
                               txn=[txn_id, created.stripe_id],
                               ttl_seconds=min(3600, state.settings.max_token_ttl))
        if row["kind"] == "checkout":
            body = {"transaction": store.render(row), "url": created.url, "stream_token": token}
        elif row["kind"] == "invoice":
            body = {"transaction": store.render(row), "client_secret": created.client_secret,
                    "amount_added": (row["details"] or {}).get("amount_added"), "stream_token": token}
        else:
            body = {"transaction": store.render(row), "client_secret": created.client_secret,
                    "stream_token": token}
        await _answer(conn, key, claim, 201, body)
    return 201, body


async def _create_at_stripe(api: StripeApi, row: asyncpg.Record, req: CreateTransaction) -> Created:
    metadata = {**req.metadata, "transaction_id": row["id"], "paystream_kind": req.kind}
    if req.kind == "subscription":
        assert req.customer_id and req.price and req.quantity
        return await subscriptions.create_at_stripe(
            api, row, customer=req.customer_id, price=req.price, quantity=req.quantity,
            trial_period_days=req.trial_period_days, metadata=metadata)
    if req.kind == "checkout":
        assert req.mode and req.success_url and req.cancel_url
        session = await api.create_checkout_session(
            row["id"], mode=req.mode, success_url=req.success_url, cancel_url=req.cancel_url,
            amount=req.amount, currency=row["currency"], price=req.price, customer=req.customer_id,
            metadata=metadata)
        total = session.amount_total
        return Created(session.id, None, url=session.url,
                       amount=total if isinstance(total, int) and total >= 0 else None,
                       currency=(session.currency or "").lower() or None)
    if req.kind == "invoice":
        assert req.customer_id is not None and req.amount is not None
        return _created_invoice(await api.create_invoice(
            row["id"], amount=req.amount, currency=row["currency"], customer=req.customer_id, coupon=req.coupon,
            metadata=metadata))
    if req.off_session:
        assert req.customer_id and req.payment_method
        pi = await api.charge_saved_card(row["id"], amount=row["amount"], currency=row["currency"],
                                         customer=req.customer_id, payment_method=req.payment_method,
                                         metadata=metadata)
        return Created(pi.id, pi.client_secret, change=_off_session_change(pi))
    if req.setup_future_usage:
        assert req.customer_id
        return await api.create_payment_intent_saving_card(
            row["id"], amount=row["amount"], currency=row["currency"], customer=req.customer_id,
            capture_method=req.capture_method or "automatic", metadata=metadata,
            setup_future_usage=req.setup_future_usage)
    return await api.create_payment_intent(
        row["id"], amount=row["amount"], currency=row["currency"], customer=req.customer_id,
        capture_method=req.capture_method or "automatic", metadata=metadata)


async def _priced_invoice(api: StripeApi, req: CreateTransaction) -> int:
    """An invoice's customer and coupon, checked before anything is stored (Stripe has
    them, and the coupon can still be applied: valid, redemptions left, an amount_off
    in the invoice's currency), and what the customer will pay: `amount` less the
    coupon's discount.  Stripe's own amount_due replaces it once the invoice is made;
    this one is there first, so an event of an invoice paid at once (nothing due) finds
    the right price."""
    assert req.customer_id is not None and req.amount is not None
    await _read(api.retrieve_customer(req.customer_id), "unknown_customer",
                f"Stripe has no customer {req.customer_id}")
    if not req.coupon:
        return req.amount
    coupon = await _read(api.retrieve_coupon(req.coupon), "unknown_coupon", f"Stripe has no coupon {req.coupon}")
    most, used = coupon.get("max_redemptions"), coupon.get("times_redeemed") or 0
    if coupon.get("valid") is False or (isinstance(most, int) and used >= most):
        raise ApiError(400, "coupon_expired", f"the coupon {req.coupon} can no longer be redeemed")
    percent, off = coupon.get("percent_off"), coupon.get("amount_off")
    if isinstance(off, int):
        if str(coupon.get("currency") or "").lower() != req.currency:
            raise ApiError(400, "coupon_not_applicable", f"the coupon {req.coupon} takes {off} off in "
                           f"{coupon.get('currency')}, not in {req.currency}")
        return req.amount - min(off, req.amount)
    if isinstance(percent, int | float) and 0 <= percent <= 100:
        return req.amount - min(req.amount, int(round(req.amount * percent / 100)))
    raise ApiError(400, "coupon_not_applicable", f"the coupon {req.coupon} has neither amount_off nor percent_off")


async def _read(call: Any, code: str, missing: str) -> dict[str, Any]:
    """A Stripe object read by id; a 400 with `code` when Stripe has no such object."""
    try:
        obj = await call
    except StripeFailure as failure:
        if failure.status == 400:  # a read by id is refused only for an id Stripe does not have
            raise ApiError(400, code, missing) from None
        raise ApiError(failure.status, failure.code, failure.message, headers=failure.headers) from None
    obj = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj or {})
    if obj.get("deleted"):
        raise ApiError(400, code, missing)
    return obj


def _created_invoice(invoice: Any) -> Created:
    """The finalised invoice: its confirmation secret for the page, its PaymentIntents to
    link, what Stripe asks the customer to pay, and `succeeded` if nothing was due (Stripe
    marks such an invoice paid as it finalises it)."""
    secret_obj = getattr(invoice, "confirmation_secret", None)
    links = []
    for item in getattr(getattr(invoice, "payments", None), "data", None) or []:
        pi = getattr(getattr(item, "payment", None), "payment_intent", None)
        if isinstance(pi, str):
            links.append(pi)
    due = getattr(invoice, "amount_due", None)
    return Created(invoice.id, getattr(secret_obj, "client_secret", None) if secret_obj else None,
                   links=tuple(links), amount=due if isinstance(due, int) and due >= 0 else None,
                   currency=(getattr(invoice, "currency", None) or "").lower() or None,
                   change=Change("succeeded", stripe_now()) if invoice.status == "paid" else None)


def _off_session_change(pi: Any) -> Change | None:
    """An off-session charge as Stripe left it.  A card that needs its holder (3-D Secure:
    Stripe's authentication_required decline, or a PaymentIntent left in requires_action)
    is requires_action, and its last_error carries the PaymentIntent's client_secret: the
    customer's page, which hears it on the stream, confirms the payment with it."""
    error = getattr(pi, "last_payment_error", None)
    if pi.status == "requires_action" or getattr(error, "code", None) == "authentication_required":
        return Change("requires_action", stripe_now(), {
            "code": "authentication_required",
            "message": "the bank asks the customer to authenticate this payment: bring them back "
                       "to confirm it with client_secret",
            "client_secret": pi.client_secret})
    return change_from_payment_intent(pi, stripe_now())


async def _record_failure(pool: asyncpg.Pool, txn_id: str, failure: StripeFailure) -> None:
    """The transaction shows what happened (pushed like any change)."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
        row = await store.lock_by_id(conn, txn_id)
        if row is not None and row["stripe_id"] is None:
            if row["kind"] == "subscription":
                if failure.status >= 500:
                    # No answer: it may exist at Stripe (and be charged).  It stays as it is,
                    # incomplete and older than any Stripe event, so its events, or a retry
                    # with the same key, still move it; an end here would refuse them all.
                    return
                status = "incomplete_expired"  # refused: it will never exist
            else:
                status = "requires_payment_method"
            await transitions.apply(conn, row, Change(status, stripe_now(), failure.as_error()),
                                    stripe_event_id=None, cause_type="paystream.stripe_error")
