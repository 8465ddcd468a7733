"""GET /v1/customers/{id}/payment-methods (API key): the cards a customer saved at Stripe
(a payment with setup_future_usage, a card validation, or the merchant's own code), as
the backend needs them to offer one and charge it off session: id, brand, last4 and
expiry.  Read from Stripe on each call: paystream stores no card."""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from paystream.auth import access
from paystream.errors import ApiError
from paystream.payments.stripe_api import StripeApi, StripeFailure

_CUSTOMER = re.compile(r"^cus_[0-9A-Za-z_]{1,251}$")
MAX_CARDS = 1000  # one answer's bound; Stripe's own customers rarely hold more than a few


def _card(pm: dict[str, Any]) -> dict[str, Any]:
    card = pm.get("card") or {}
    return {"id": pm["id"], "brand": card.get("brand"), "last4": card.get("last4"),
            "exp_month": card.get("exp_month"), "exp_year": card.get("exp_year")}


async def list_payment_methods(request: Request) -> JSONResponse:
    access.backend(request)
    customer = request.path_params["id"]
    if not _CUSTOMER.match(customer):
        raise ApiError(400, "bad_request", "a customer id is cus_ and up to 251 letters, digits or _")
    api: StripeApi | None = request.app.state.stripe
    if api is None:
        raise ApiError(503, "stripe_not_configured", "STRIPE_API_KEY is not set on this server")
    try:
        cards = await api.list_cards(customer, MAX_CARDS)
    except StripeFailure as failure:
        raise ApiError(failure.status if failure.status != 400 else 502, failure.code, failure.message,
                       headers=failure.headers) from None
    if cards is None:
        raise ApiError(404, "customer_not_found", f"Stripe has no customer {customer}")
    return JSONResponse({"data": [_card(pm) for pm in cards]})
