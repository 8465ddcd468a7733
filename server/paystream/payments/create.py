"""POST /v1/transactions: our row first, then the Stripe object, then the link.

The row is committed before Stripe is called, so an event Stripe sends about the new
object always finds it (by the transaction_id in the object's metadata).  Stripe's own
idempotency key is derived from our transaction id, and Idempotency-Key on our endpoint
returns the first answer again, so a retried request never makes a second object.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import asyncpg
from pydantic import BaseModel, Field, field_validator
from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import JSONResponse

from paystream.auth import access, tokens
from paystream.bodies import MAX_JSON_BODY, read_limited, validated
from paystream.changes import store, transitions
from paystream.changes.lifecycle import BEFORE_STRIPE, KINDS, Change, stripe_now
from paystream.db import ACQUIRE_TIMEOUT
from paystream.errors import ApiError
from paystream.payments.stripe_api import Created, StripeApi, StripeFailure

CARD_VALIDATION_AMOUNT = 100  # $1, authorised then released


class CreateTransaction(BaseModel):
    model_config = {"extra": "forbid"}
    kind: Literal[KINDS]  # type: ignore[valid-type]  # the tuple spells out the Literal
    amount: int | None = Field(default=None, gt=0, le=99_999_999)
    currency: str = Field(default="usd", pattern=r"^[a-zA-Z]{3}$")
    customer_id: str | None = Field(default=None, min_length=1, max_length=255)
    capture_method: Literal["automatic", "manual"] | None = None
    metadata: dict[str, str] = Field(default_factory=dict, max_length=40)
    coupon: str | None = Field(default=None, min_length=1, max_length=255)  # invoices only

    @field_validator("customer_id", "coupon")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if "\x00" in key or "\x00" in item:
                raise ValueError("metadata must not contain NUL characters")
            if len(key) > 40 or len(item) > 500:  # Stripe's own limits
                raise ValueError("metadata keys are at most 40 characters and values 500")
            if key in ("transaction_id", "paystream_kind"):
                raise ValueError(f"metadata key {key!r} is set by paystream")
        return value

    def checked(self) -> CreateTransaction:
        """The rules across fields, common ones first (a kind never skips them)."""
        if self.coupon and self.kind != "invoice":
            raise ApiError(400, "bad_request", "coupon applies to invoices only")
        req = self.model_copy(update={"currency": self.currency.lower()})
        if req.kind == "card_validation":
            if req.amount not in (None, CARD_VALIDATION_AMOUNT) or req.capture_method == "automatic":
                raise ApiError(400, "bad_request", "a card validation is a $1 (amount 100) manual capture")
            return req.model_copy(update={"amount": CARD_VALIDATION_AMOUNT, "capture_method": "manual"})
        if req.amount is None:
            raise ApiError(400, "bad_request", "amount is required")
        if req.kind in ("wallet_top_up", "invoice") and not req.customer_id:
            raise ApiError(400, "bad_request", f"a {req.kind} needs customer_id")
        return req


def _parse(raw: bytes) -> CreateTransaction:
    return validated(CreateTransaction, raw).checked()


async def _claim_key(conn: asyncpg.Connection, key: str, digest: str) -> asyncpg.Record | None:
    """Record the key, or return its earlier use (locked until this transaction ends)."""
    inserted = await conn.fetchval(
        "INSERT INTO idempotency_keys (key, request_hash) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING true",
        key, digest)
    if inserted:
        return None
    earlier = await conn.fetchrow("SELECT * FROM idempotency_keys WHERE key = $1 FOR UPDATE", key)
    if earlier["request_hash"] != digest:
        raise ApiError(400, "idempotency_key_reused", "this Idempotency-Key was used with a different body")
    return earlier


async def _remember(pool: asyncpg.Pool, key: str | None, status: int, body: dict) -> None:
    if key:
        await pool.execute("UPDATE idempotency_keys SET status_code = $2, response = $3 WHERE key = $1",
                           key, status, body)


async def create_transaction(request: Request) -> JSONResponse:
    access.backend(request)
    raw = await read_limited(request, MAX_JSON_BODY)
    key = request.headers.get("idempotency-key")
    if key is not None and (not 1 <= len(key) <= 255 or "\x00" in key):
        raise ApiError(400, "bad_request", "Idempotency-Key must be 1 to 255 characters")
    status, body = await create(request.app.state, raw, key)
    return JSONResponse(body, status_code=status)


async def create(state: State, raw: bytes, key: str | None) -> tuple[int, dict[str, Any]]:
    """Create a transaction from a request body; the HTTP status and body to answer."""
    api: StripeApi | None = state.stripe
    if api is None:
        raise ApiError(503, "stripe_not_configured", "STRIPE_API_KEY is not set on this server")
    req = _parse(raw)
    pool: asyncpg.Pool = state.pool

    async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
        earlier = await _claim_key(conn, key, hashlib.sha256(raw).hexdigest()) if key else None
        if earlier is not None and earlier["response"] is not None:
            return earlier["status_code"], earlier["response"]
        if earlier is not None and earlier["transaction_id"] is not None:
            row = await store.lock_by_id(conn, earlier["transaction_id"])  # a retry after a 502
        else:
            txn_id = store.new_transaction_id()
            await transitions.lock_for_writing(conn, txn_id)
            row = await transitions.create(
                conn, txn_id=txn_id, stripe_id=None, kind=req.kind, amount=req.amount or 0,
                currency=req.currency, customer_id=req.customer_id, metadata=req.metadata,
                change=Change("requires_payment_method", BEFORE_STRIPE),
                stripe_event_id=None, cause_type="paystream.transaction.created")
            await transitions.unpark(conn, txn_id)
            if key:
                await conn.execute("UPDATE idempotency_keys SET transaction_id = $2 WHERE key = $1", key, txn_id)
    assert row is not None
    txn_id = row["id"]

    try:
        created = await _create_at_stripe(api, row, req)
    except StripeFailure as failure:
        await _record_failure(pool, txn_id, failure)
        body = {"error": failure.as_error() | {"transaction_id": txn_id}}
        if failure.status < 500:
            await _remember(pool, key, failure.status, body)  # final: the same answer again
        return failure.status, body

    async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
        await transitions.lock_for_writing(conn, txn_id)
        await store.set_stripe_id(conn, txn_id, created.stripe_id)
        for linked in created.links:
            await store.link(conn, linked, txn_id)
        row = await store.get_transaction(conn, txn_id)
    token, _ = tokens.mint(state.settings.paystream_token_secret,
                           txn=[txn_id, created.stripe_id],
                           ttl_seconds=min(3600, state.settings.max_token_ttl))
    body = {"transaction": store.render(row), "client_secret": created.client_secret, "stream_token": token}
    await _remember(pool, key, 201, json.loads(json.dumps(body)))
    return 201, body


async def _create_at_stripe(api: StripeApi, row: asyncpg.Record, req: CreateTransaction) -> Created:
    metadata = {**req.metadata, "transaction_id": row["id"], "paystream_kind": req.kind}
    if req.kind == "invoice":
        assert req.customer_id is not None
        return await api.create_invoice(row["id"], amount=row["amount"], currency=row["currency"],
                                        customer=req.customer_id, coupon=req.coupon, metadata=metadata)
    return await api.create_payment_intent(
        row["id"], amount=row["amount"], currency=row["currency"], customer=req.customer_id,
        capture_method=req.capture_method or "automatic", metadata=metadata)


async def _record_failure(pool: asyncpg.Pool, txn_id: str, failure: StripeFailure) -> None:
    """The transaction shows what happened (pushed like any change)."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
        row = await store.lock_by_id(conn, txn_id)
        if row is not None and row["stripe_id"] is None:
            await transitions.apply(
                conn, row, Change("requires_payment_method", stripe_now(), failure.as_error()),
                stripe_event_id=None, cause_type="paystream.stripe_error")
