"""POST /v1/transactions/{id}/refunds: the merchant's backend refunds through paystream.

The refund is written first, `pending`, in the database transaction that locks its
transaction and checks that it fits in what was captured less what is refunded or being
refunded (changes/refunds.py), so concurrent refunds can never together exceed it and a
refund that does not fit never reaches Stripe.  Then one call to Stripe, keyed by the
refund's id (a retry, ours or the recovery pass's, gets the refund Stripe already made),
and its answer recorded and applied: the refund's status, and once it succeeded the
transaction's refunded total and status, logged and pushed (`cause.type` paystream.refund).

`Idempotency-Key` names one refund of that transaction: the same key again answers that
refund as it stands (a different body with it is `400 idempotency_key_reused`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any

import asyncpg
from pydantic import BaseModel, Field, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse

from paystream.auth import access
from paystream.bodies import MAX_JSON_BODY, read_limited, stripe_metadata, validated
from paystream.changes import refunds, store, transitions
from paystream.changes.lifecycle import stripe_now
from paystream.db import ACQUIRE_TIMEOUT
from paystream.errors import ApiError
from paystream.payments.stripe_api import StripeApi, StripeFailure

log = logging.getLogger("paystream.refunds")

# Kinds whose money comes through a PaymentIntent paystream can name to Stripe.
REFUNDABLE_KINDS = ("payment", "wallet_top_up", "invoice")
# How long a request waits for another holding its Idempotency-Key before 409.
WAIT = 5.0


class RefundRequest(BaseModel):
    model_config = {"extra": "forbid"}
    amount: int | None = Field(default=None, gt=0, le=99_999_999)
    reason: str | None = Field(default=None, pattern=r"^(duplicate|fraudulent|requested_by_customer)$")
    metadata: dict[str, str] = Field(default_factory=dict, max_length=40)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str]) -> dict[str, str]:
        return stripe_metadata(value, reserved=("paystream_refund_id", "transaction_id"))


async def _payment_intent(conn: asyncpg.Connection, txn: asyncpg.Record) -> str | None:
    """The PaymentIntent Stripe refunds for this transaction (an invoice's, through its link)."""
    if (txn["stripe_id"] or "").startswith("pi_"):
        return txn["stripe_id"]
    return await conn.fetchval(
        "SELECT stripe_id FROM transaction_links WHERE transaction_id = $1 AND stripe_id LIKE 'pi\\_%'"
        " ORDER BY stripe_id LIMIT 1", txn["id"])


async def create_refund(request: Request) -> JSONResponse:
    access.backend(request)
    state = request.app.state
    api: StripeApi | None = state.stripe
    if api is None:
        raise ApiError(503, "stripe_not_configured", "STRIPE_API_KEY is not set on this server")
    raw = await read_limited(request, MAX_JSON_BODY)
    req = validated(RefundRequest, raw or b"{}")
    key = request.headers.get("idempotency-key")
    if key is not None and (not 1 <= len(key) <= 255 or "\x00" in key):
        raise ApiError(400, "bad_request", "Idempotency-Key must be 1 to 255 characters")
    digest = hashlib.sha256(raw or b"{}").hexdigest()
    deadline = time.monotonic() + WAIT
    while True:
        outcome = await _reserve_or_find(state.pool, request.path_params["id"], req, key, digest)
        if isinstance(outcome, JSONResponse):
            return outcome
        if outcome is not None:
            txn, refund, payment_intent = outcome
            break
        # Another request with this key is calling Stripe for it: its answer is coming.
        if time.monotonic() >= deadline:
            raise ApiError(409, "idempotency_key_in_flight", "another request with this Idempotency-Key is "
                           "refunding now; ask again shortly", {"Retry-After": "1"})
        await asyncio.sleep(0.1)  # polling an outside fact: another request's commit

    try:
        made = await api.create_refund(
            refund["id"], payment_intent=payment_intent, amount=refund["amount"], reason=refund["reason"],
            metadata={**(refund["metadata"] or {}), "paystream_refund_id": refund["id"], "transaction_id": txn["id"]})
    except StripeFailure as failure:
        if failure.status >= 500:
            # Stripe may or may not have made it: it stays pending (holding its amount) and
            # the recovery pass, or this request again, asks Stripe with the same key.
            log.warning("refund %s not confirmed by Stripe: %s", refund["id"], failure.message,
                        extra={"transaction_id": txn["id"]})
            await state.pool.execute("UPDATE refunds SET claimed_until = NULL WHERE id = $1", refund["id"])
            raise ApiError(failure.status, failure.code, f"{failure.message}; refund {refund['id']} is pending "
                           "and is retried", failure.headers) from None
        await settle(state.pool, txn["id"], refund["id"], None, "failed", failure.message)
        raise ApiError(failure.status, failure.code, failure.message) from None
    refund_row, row = await settle(state.pool, txn["id"], refund["id"], _get(made, "id"),
                                   _get(made, "status") or "pending", _get(made, "failure_reason"))
    return JSONResponse({"refund": refunds.render(refund_row), "transaction": store.render(row)}, status_code=201)


async def _reserve_or_find(pool: asyncpg.Pool, any_id: str, req: RefundRequest, key: str | None,
                           digest: str) -> tuple[Any, Any, str] | JSONResponse | None:
    """In one database transaction with the transaction's row locked: the refund to ask
    Stripe for (new, or the key's whose call failed or whose holder is gone; claimed),
    with its transaction and PaymentIntent; or the answer the key already has; or None
    while another request holds the key's refund."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
        found = await store.get_transaction(conn, any_id)
        if found is None:
            raise ApiError(404, "not_found", "no such transaction")
        txn = await store.lock_by_id(conn, found["id"])
        earlier = await refunds.by_key(conn, txn["id"], key) if key is not None else None
        if earlier is not None:
            if earlier["request_hash"] != digest:
                raise ApiError(400, "idempotency_key_reused", "this Idempotency-Key was used for another refund request")
            if earlier["stripe_id"] is not None or earlier["status"] != "pending":
                return JSONResponse({"refund": refunds.render(earlier), "transaction": store.render(txn)},
                                    status_code=201)
            if earlier["claimed"]:
                return None
            refund = earlier  # its Stripe call failed, or its holder is gone: again, with the same Stripe key
        else:
            if txn["kind"] not in REFUNDABLE_KINDS or txn["status"] not in refunds.CAPTURED:
                raise ApiError(409, "not_refundable", f"this {txn['kind']} is {txn['status']}: it took no money to refund")
            room = await refunds.room(conn, txn)
            amount = req.amount if req.amount is not None else room
            if amount <= 0 or amount > room:
                raise ApiError(400, "refund_exceeds_captured",
                               f"{amount} is more than the {max(room, 0)} left to refund of the "
                               f"{refunds.captured(txn)} captured")
            refund = await refunds.reserve(conn, txn, amount=amount, reason=req.reason, metadata=req.metadata,
                                           key=key, request_hash=digest)
        payment_intent = await _payment_intent(conn, txn)
        if payment_intent is None:
            raise ApiError(409, "not_refundable", "this transaction has no PaymentIntent at Stripe to refund")
        await refunds.claim(conn, refund["id"])
    return txn, refund, payment_intent


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


async def settle(pool: asyncpg.Pool, txn_id: str, refund_id: str, stripe_id: str | None, status: str,
                 failure_reason: str | None) -> tuple[asyncpg.Record, Any]:
    """Record what Stripe said of our refund and apply it to its transaction (pushed)."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
        txn = await store.lock_by_id(conn, txn_id)
        refund_row = await refunds.record(conn, refund_id, stripe_id=stripe_id, status=status,
                                          failure_reason=failure_reason)
        _, row = await transitions.apply(conn, txn, await refunds.change_for(conn, txn, stripe_now()),
                                         stripe_event_id=None, cause_type="paystream.refund")
    return refund_row, row


async def retry_pending(pool: asyncpg.Pool, api: StripeApi, older_than: float = 60.0) -> tuple[int, list[str]]:
    """The recovery pass's part: refunds of ours still pending, unclaimed, for longer than
    `older_than` seconds: asked of Stripe again (made again with the same Stripe key if
    Stripe never answered; read back if Stripe said pending) and settled.  Returns how
    many moved and the errors met."""
    rows = await pool.fetch(
        """SELECT r.id, r.transaction_id, r.stripe_id, r.amount, r.reason, r.metadata
             FROM refunds r
            WHERE r.status IN ('pending', 'requires_action') AND r.origin = 'paystream'
              AND (r.claimed_until IS NULL OR r.claimed_until < clock_timestamp())
              AND r.updated_at < clock_timestamp() - make_interval(secs => $1)
            ORDER BY r.updated_at LIMIT 100""", older_than)
    moved, errors = 0, []
    for row in rows:
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
            txn = await store.lock_by_id(conn, row["transaction_id"])
            payment_intent = await _payment_intent(conn, txn)
            await refunds.claim(conn, row["id"])
        try:
            if row["stripe_id"] is not None:
                made = await api.retrieve_refund(row["stripe_id"])
            else:
                made = await api.create_refund(
                    row["id"], payment_intent=payment_intent, amount=row["amount"], reason=row["reason"],
                    metadata={**(row["metadata"] or {}), "paystream_refund_id": row["id"],
                              "transaction_id": row["transaction_id"]})
        except StripeFailure as failure:
            errors.append(f"refund {row['id']}: {failure.message}")
            if failure.status >= 500:
                await pool.execute("UPDATE refunds SET claimed_until = NULL WHERE id = $1", row["id"])
                break
            # Refused: it will never be made (as create_refund settles a refusal).
            await settle(pool, row["transaction_id"], row["id"], None, "failed", failure.message)
            moved += 1
            continue
        await settle(pool, row["transaction_id"], row["id"], _get(made, "id"), _get(made, "status") or "pending",
                     _get(made, "failure_reason"))
        moved += 1
    return moved, errors
