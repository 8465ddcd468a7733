"""The /demo checkout, served by `paystream dev` only: create_app() is dev's app factory,
the production app plus these routes (`serve` never imports this module).

Its small API plays the two parts a real integration splits: the merchant's backend
(creating the transaction with our API key) and Stripe.js in the browser (paying at the
local Stripe stand-in, server-side here so the page needs no CORS).  Events localstripe
never emits (requires_action) are signed and posted as `paystream trigger` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from paystream.bodies import json_body
from paystream.changes import store
from paystream.dev import trigger
from paystream.errors import ApiError
from paystream.payments import create as payments

HERE = Path(__file__).resolve().parent
PAGE = HERE / "demo.html"
# A checkout's fresh build of the SDK, else the copy a wheel carries (the build puts it there).
SDK_BUNDLES = (HERE.parents[2] / "client-sdk" / "dist" / "paystream.min.js", HERE / "static" / "paystream.min.js")
CARDS = {"visa": "4242424242424242", "3ds": "4000000000003220", "decline": "4000000000000341"}
CONTRACT = "contract_brand_refresh"


NO_SDK = ("the SDK bundle is not built, so /demo cannot follow a payment: build it (scripts/sdk-install) "
          "and restart; a wheel carries it only if it was built first")


def sdk_bundle() -> Path | None:
    return next((bundle for bundle in SDK_BUNDLES if bundle.exists()), None)


async def page(request: Request) -> HTMLResponse:
    html = PAGE.read_text()
    if sdk_bundle() is None:  # the page's one import would fail and leave it dead: say why on it
        html = html.replace('<div id="nosdk" hidden>', '<div id="nosdk">', 1)
    return HTMLResponse(html)


async def sdk(request: Request) -> Response:
    bundle = sdk_bundle()
    if bundle is not None:
        return FileResponse(bundle, media_type="text/javascript")
    return Response("// SDK not built: scripts/sdk-install (npm --prefix client-sdk ci && npm --prefix client-sdk run build)\n",
                    status_code=503, media_type="text/javascript")


def _stripe(request: Request) -> httpx.AsyncClient:
    base = request.app.state.settings.stripe_api_base
    key = request.app.state.settings.stripe_api_key
    return httpx.AsyncClient(base_url=base, timeout=10, headers={"Authorization": f"Bearer {key}"})


async def _payment_intent(request: Request, txn_id: object) -> str:
    row = await store.get_transaction(request.app.state.pool, str(txn_id)) if isinstance(txn_id, str) else None
    if row is None or not (row["stripe_id"] or "").startswith("pi_"):
        raise ApiError(404, "not_found", "no such demo transaction")
    return row["stripe_id"]


async def checkout(request: Request) -> JSONResponse:
    """The merchant backend: create the $150 revisions purchase for the demo contract."""
    raw = json.dumps({"kind": "payment", "amount": 15000, "currency": "usd",
                      "metadata": {"contractId": CONTRACT}}).encode()
    status, body = await payments.create(request.app.state, raw, None)
    if status != 201:
        return JSONResponse(body, status_code=status)
    return JSONResponse({"transaction_id": body["transaction"]["id"], "stream_token": body["stream_token"],
                         "client_secret": body["client_secret"]}, status_code=201)


async def pay(request: Request) -> JSONResponse:
    """Stripe.js: attach the chosen test card and confirm."""
    body = await json_body(request)
    card = CARDS.get(str(body.get("card")))
    if card is None:
        raise ApiError(400, "bad_request", f"card is one of {sorted(CARDS)}")
    pi = await _payment_intent(request, body.get("transaction_id"))
    async with _stripe(request) as stripe:
        pm = await stripe.post("/v1/payment_methods", data={
            "type": "card", "card[number]": card, "card[exp_month]": "12", "card[exp_year]": "2030",
            "card[cvc]": "123"})
        await stripe.post(f"/v1/payment_intents/{pi}", data={"payment_method": pm.json()["id"]})
        confirmed = await stripe.post(f"/v1/payment_intents/{pi}/confirm")
    result = confirmed.json()
    status = result.get("status") if confirmed.is_success else "declined"
    if status == "requires_action":
        # Stripe would send this event; localstripe does not, so we sign and post it.
        event = trigger.build("payment_intent.requires_action", pi, amount=15000,
                              metadata={"contractId": CONTRACT, "transaction_id": str(body["transaction_id"])})
        raw = trigger.encode(event)
        secret = request.app.state.settings.webhook_secrets[0]
        async with httpx.AsyncClient(timeout=10) as client:
            await client.post(str(request.url_for("stripe_webhook")), content=raw, headers={
                "Content-Type": "application/json", "Stripe-Signature": trigger.sign(raw, secret)})
    return JSONResponse({"status": status})


async def authenticate(request: Request) -> JSONResponse:
    """The bank's 3-D Secure challenge, passed."""
    body = await json_body(request)
    pi = await _payment_intent(request, body.get("transaction_id"))
    async with _stripe(request) as stripe:
        pi_obj = (await stripe.get(f"/v1/payment_intents/{pi}")).json()
        done = await stripe.post(f"/v1/payment_intents/{pi}/_authenticate",
                                 data={"client_secret": pi_obj["client_secret"], "success": "true"})
    return JSONResponse({"status": done.json().get("status")}, status_code=200 if done.is_success else 400)


async def revisions(request: Request) -> JSONResponse:
    """The contract's revisions, kept by the example effect examples.contract_revisions
    (`paystream dev` enables it when run from a checkout)."""
    pool = request.app.state.pool
    if not await pool.fetchval("SELECT to_regclass('contract_revisions') IS NOT NULL"):
        return JSONResponse({"enabled": False, "available": None})
    row = await pool.fetchrow(
        "SELECT purchased, used, available FROM contract_revisions WHERE contract_id = $1", CONTRACT)
    return JSONResponse({"enabled": True, **(dict(row) if row else {"purchased": 0, "used": 0, "available": 3})})


routes = [
    Route("/demo", page),
    Route("/demo/paystream.js", sdk),
    Route("/demo/api/checkout", checkout, methods=["POST"]),
    Route("/demo/api/pay", pay, methods=["POST"]),
    Route("/demo/api/authenticate", authenticate, methods=["POST"]),
    Route("/demo/api/revisions", revisions),
]


def create_app() -> Starlette:
    """`paystream dev`'s app: the production app with the /demo routes (unauthenticated)."""
    import logging

    from paystream.app import create_app as create_production_app

    app = create_production_app(extra_routes=routes)
    if sdk_bundle() is None:
        logging.getLogger("paystream.demo").warning(NO_SDK)
    return app
