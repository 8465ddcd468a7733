"""What the merchant's backend asks of a payment after it was authorised: capture it, or
cancel it.  Each is one call to Stripe, idempotent (Stripe's idempotency key is derived
from the transaction, so a repeat never captures twice), and its answer is applied like
a webhook: through the state machine, logged, pushed (`cause.type` paystream.capture /
paystream.cancel)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse

from paystream.auth import access
from paystream.bodies import MAX_JSON_BODY, read_limited, validated
from paystream.changes import store, transitions
from paystream.changes.lifecycle import REFUNDABLE, stripe_now
from paystream.db import ACQUIRE_TIMEOUT
from paystream.errors import ApiError
from paystream.payments.current import change_from_payment_intent
from paystream.payments.stripe_api import StripeApi, StripeFailure

# Kinds whose Stripe object is a PaymentIntent the merchant may capture or cancel.
_PAYMENT_KINDS = ("payment", "wallet_top_up")


class CaptureRequest(BaseModel):
    model_config = {"extra": "forbid"}
    amount: int | None = Field(default=None, gt=0, le=99_999_999)


class CancelRequest(BaseModel):
    model_config = {"extra": "forbid"}
    reason: str | None = Field(default=None, pattern=r"^(duplicate|fraudulent|requested_by_customer|abandoned)$")


async def _body(request: Request, model: type[BaseModel]) -> Any:
    raw = await read_limited(request, MAX_JSON_BODY)
    return validated(model, raw or b"{}")


async def _payment(request: Request) -> tuple[StripeApi, Any]:
    access.backend(request)
    api: StripeApi | None = request.app.state.stripe
    if api is None:
        raise ApiError(503, "stripe_not_configured", "STRIPE_API_KEY is not set on this server")
    row = await store.get_transaction(request.app.state.pool, request.path_params["id"])
    if row is None:
        raise ApiError(404, "not_found", "no such transaction")
    if row["kind"] not in _PAYMENT_KINDS or not (row["stripe_id"] or "").startswith("pi_"):
        raise ApiError(409, "not_a_payment", f"a {row['kind']} transaction has no payment to capture or cancel")
    return api, row


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


async def _apply(request: Request, row: Any, pi: Any, cause: str) -> JSONResponse:
    change = change_from_payment_intent(pi, stripe_now())
    async with request.app.state.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
        locked = await store.lock_by_id(conn, row["id"])
        if change is not None:  # a partial capture carries what it took (transitions.apply)
            _, locked = await transitions.apply(conn, locked, change, stripe_event_id=None, cause_type=cause)
    return JSONResponse({"transaction": store.render(locked)})


def _stripe_error(failure: StripeFailure) -> ApiError:
    status = failure.status if failure.status in (400, 402, 503) else 502
    return ApiError(status, failure.code, failure.message, failure.headers)


async def capture(request: Request) -> JSONResponse:
    """POST /v1/transactions/{id}/capture {"amount"?}: capture an authorised payment, all of
    it or `amount` of it (Stripe releases the rest)."""
    api, row = await _payment(request)
    req = await _body(request, CaptureRequest)
    if row["status"] in REFUNDABLE:
        return JSONResponse({"transaction": store.render(row)})  # captured already: the same answer
    if row["status"] == "canceled":
        raise ApiError(409, "not_capturable", "the payment was canceled: there is nothing to capture")
    # Before that, Stripe knows best whether it is authorised (the webhook saying so may
    # not have come yet): it refuses a capture that is not, and nothing changes here.
    if req.amount is not None and req.amount > row["amount"]:
        raise ApiError(400, "capture_exceeds_authorized",
                       f"amount {req.amount} is more than the {row['amount']} authorised")
    try:
        # Read first: a capture Stripe refuses would be kept under its idempotency key for
        # a day, and a capture once the payment is authorised would get that refusal back.
        pi = await api.retrieve_payment_intent(row["stripe_id"])
        if _get(pi, "status") == "requires_capture":
            key = f"{req.amount or 'all'}"
            pi = await api.capture_payment_intent(row["id"], row["stripe_id"], req.amount, key)
        elif _get(pi, "status") != "succeeded":
            raise ApiError(409, "not_capturable", f"the payment is {_get(pi, 'status')} at Stripe, not authorised:"
                           " there is nothing to capture yet")
    except StripeFailure as failure:
        raise _stripe_error(failure) from None
    return await _apply(request, row, pi, "paystream.capture")


async def cancel(request: Request) -> JSONResponse:
    """POST /v1/transactions/{id}/cancel {"reason"?}: cancel a payment not captured yet
    (Stripe releases an authorisation)."""
    api, row = await _payment(request)
    req = await _body(request, CancelRequest)
    if row["status"] == "canceled":
        return JSONResponse({"transaction": store.render(row)})  # canceled already: the same answer
    if row["status"] not in ("requires_payment_method", "requires_confirmation", "requires_action",
                             "requires_capture"):
        raise ApiError(409, "not_cancelable",
                       f"the payment is {row['status']}: only a payment not yet captured can be canceled"
                       " (refund it instead)")
    try:
        pi = await api.cancel_payment_intent(row["id"], row["stripe_id"], req.reason or "requested")
    except StripeFailure as failure:
        raise _stripe_error(failure) from None
    return await _apply(request, row, pi, "paystream.cancel")
