"""The /demo checkout, served by `paystream dev` only: create_app() is dev's app factory,
the production app plus these routes (`serve` never imports this module).

Two products: 2 extra revisions ($150, a payment) and the Studio plan ($49 a month, a
subscription whose first payment the page confirms, 3-D Secure included).  Either can
instead be paid on Stripe's hosted Checkout page, after which the customer lands on
/demo/return?session_id=cs_…, which follows the session live.

Its small API plays the parts a real integration splits: the merchant's backend
(creating the transaction with our API key, minting a stream token for the return page)
and Stripe.js in the browser (paying at the local Stripe stand-in, server-side here so
the page needs no CORS).  Events localstripe never emits (requires_action) are signed and
posted as `paystream trigger` does.  Stripe's hosted page is played by /demo/hosted/cs_…,
which pays through the emulator's own endpoint (paystream.dev.emulator.checkout) and
sends the customer to the session's success_url as Stripe does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import quote

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from paystream.auth import tokens
from paystream.bodies import json_body
from paystream.changes import store
from paystream.dev import trigger
from paystream.errors import ApiError
from paystream.payments import create as payments

HERE = Path(__file__).resolve().parent
PAGE = HERE / "demo.html"
RETURN_PAGE = HERE / "demo_return.html"
HOSTED_PAGE = HERE / "demo_hosted.html"
# A checkout's fresh build of the SDK, else the copy a wheel carries (the build puts it there).
SDK_BUNDLES = (HERE.parents[2] / "client-sdk" / "dist" / "paystream.min.js", HERE / "static" / "paystream.min.js")
CARDS = {"visa": "4242424242424242", "3ds": "4000000000003220", "decline": "4000000000000341"}
CONTRACT = "contract_brand_refresh"
PLAN = {"unit_amount": 4900, "currency": "usd", "name": "Studio plan"}  # a month
# What the stand-in for Stripe's hosted page offers: cards, and a SEPA Debit whose
# payment settles moments after the session completes (so the return page shows it live).
HOSTED_METHODS = {"visa": {"card": CARDS["visa"]}, "decline": {"card": CARDS["decline"]},
                  "sepa": {"iban": "DE89370400440532013000"}}
SESSION_ID = re.compile(r"cs_[A-Za-z0-9_]{1,250}")


NO_SDK = ("the SDK bundle is not built, so /demo cannot follow a payment: build it (scripts/sdk-install) "
          "and restart; a wheel carries it only if it was built first")


def sdk_bundle() -> Path | None:
    return next((bundle for bundle in SDK_BUNDLES if bundle.exists()), None)


def with_sdk_check(html: str) -> str:
    if sdk_bundle() is None:  # the page's one import would fail and leave it dead: say why on it
        html = html.replace('<div id="nosdk" hidden>', '<div id="nosdk">', 1)
    return html


async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(with_sdk_check(PAGE.read_text()))


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


async def _payment_intent(request: Request, body: dict) -> str:
    """The PaymentIntent to confirm: a payment transaction's own, or the one a client
    secret names (a subscription's first invoice's), as Stripe.js takes it."""
    secret = body.get("client_secret")
    if isinstance(secret, str) and re.fullmatch(r"pi_[A-Za-z0-9]+_secret_[A-Za-z0-9]+", secret):
        pi = secret.split("_secret_")[0]
        async with _stripe(request) as stripe:
            found = await stripe.get(f"/v1/payment_intents/{pi}")
        if found.is_success and found.json().get("client_secret") == secret:
            return pi
        raise ApiError(404, "not_found", "no PaymentIntent has that client secret")
    txn_id = body.get("transaction_id")
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
    pi = await _payment_intent(request, body)
    async with _stripe(request) as stripe:
        pm = await stripe.post("/v1/payment_methods", data={
            "type": "card", "card[number]": card, "card[exp_month]": "12", "card[exp_year]": "2030",
            "card[cvc]": "123"})
        await stripe.post(f"/v1/payment_intents/{pi}", data={"payment_method": pm.json()["id"]})
        confirmed = await stripe.post(f"/v1/payment_intents/{pi}/confirm")
    result = confirmed.json()
    status = result.get("status") if confirmed.is_success else "declined"
    if status == "requires_action" and "transaction_id" in body:
        # Stripe would send this event; localstripe does not, so we sign and post it.  (A
        # subscription stays incomplete meanwhile: its page learns of 3-D Secure from this
        # answer, as from Stripe.js's confirmCardPayment.)
        event = trigger.build("payment_intent.requires_action", pi, amount=15000,
                              metadata={"contractId": CONTRACT, "transaction_id": str(body["transaction_id"])})
        raw = trigger.encode(event)
        secret = request.app.state.settings.webhook_secrets[0]
        async with httpx.AsyncClient(timeout=10) as client:
            await client.post(str(request.url_for("stripe_webhook")), content=raw, headers={
                "Content-Type": "application/json", "Stripe-Signature": trigger.sign(raw, secret)})
    answer = {"status": status}
    if not confirmed.is_success:  # Stripe.js's confirm gives the page the decline's message
        answer["message"] = (result.get("error") or {}).get("message")
    return JSONResponse(answer)


async def authenticate(request: Request) -> JSONResponse:
    """The bank's 3-D Secure challenge, passed."""
    body = await json_body(request)
    pi = await _payment_intent(request, body)
    async with _stripe(request) as stripe:
        pi_obj = (await stripe.get(f"/v1/payment_intents/{pi}")).json()
        done = await stripe.post(f"/v1/payment_intents/{pi}/_authenticate",
                                 data={"client_secret": pi_obj["client_secret"], "success": "true"})
    return JSONResponse({"status": done.json().get("status")}, status_code=200 if done.is_success else 400)


async def _plan_price(request: Request) -> str:
    """The Studio plan's monthly price at the local Stripe, made on first use."""
    state = request.app.state
    price = getattr(state, "demo_plan_price", None)
    if price is None:
        async with _stripe(request) as stripe:
            made = await stripe.post("/v1/prices", data={
                "currency": PLAN["currency"], "unit_amount": str(PLAN["unit_amount"]),
                "recurring[interval]": "month", "product_data[name]": PLAN["name"]})
        if not made.is_success:
            raise ApiError(502, "stripe_error", "the local Stripe has no prices: run `paystream dev` without "
                           "STRIPE_API_BASE, or start it with --extensions paystream.dev.emulator")
        price = state.demo_plan_price = made.json()["id"]
    return price


async def subscribe(request: Request) -> JSONResponse:
    """The merchant backend: a new customer signs up for the Studio plan.  Without a saved
    card the subscription starts incomplete, with its first invoice's client secret."""
    price = await _plan_price(request)
    async with _stripe(request) as stripe:
        customer = (await stripe.post("/v1/customers", data={"email": "customer@example.com"})).json()["id"]
    raw = json.dumps({"kind": "subscription", "customer_id": customer, "price": price,
                      "metadata": {"plan": "studio"}}).encode()
    status, body = await payments.create(request.app.state, raw, None)
    if status != 201:
        return JSONResponse(body, status_code=status)
    return JSONResponse({"transaction_id": body["transaction"]["id"], "stream_token": body["stream_token"],
                         "client_secret": body["client_secret"], "status": body["transaction"]["status"]},
                        status_code=201)


async def hosted(request: Request) -> JSONResponse:
    """The merchant backend: a Checkout Session for either product; the page sends the
    customer to its `url`, and Stripe sends them back to /demo/return?session_id=…"""
    body = await json_body(request)
    base = str(request.base_url).rstrip("/")
    urls = {"success_url": f"{base}/demo/return?session_id={{CHECKOUT_SESSION_ID}}", "cancel_url": f"{base}/demo"}
    if body.get("product") == "plan":
        order = {"mode": "subscription", "price": await _plan_price(request), "metadata": {"plan": "studio"}}
    else:
        order = {"mode": "payment", "amount": 15000, "currency": "usd", "metadata": {"contractId": CONTRACT}}
    status, created = await payments.create(request.app.state, json.dumps({"kind": "checkout", **order, **urls}).encode(),
                                            None)
    if status != 201:
        return JSONResponse(created, status_code=status)
    return JSONResponse({"url": created["url"], "transaction_id": created["transaction"]["id"]}, status_code=201)


def _session_id(value: object) -> str:
    if not isinstance(value, str) or not SESSION_ID.fullmatch(value):
        raise ApiError(400, "bad_request", "session_id is a Checkout Session id (cs_…)")
    return value


async def _session(request: Request, session_id: str) -> dict:
    async with _stripe(request) as stripe:
        found = await stripe.get(f"/v1/checkout/sessions/{session_id}")
    if not found.is_success:
        raise ApiError(404, "not_found", "no such Checkout Session")
    return found.json()


async def hosted_page(request: Request) -> HTMLResponse:
    """Stands in for Stripe's hosted Checkout page (checkout.stripe.com), which the local
    Stripe cannot serve."""
    await _session(request, _session_id(request.path_params["session_id"]))
    return HTMLResponse(HOSTED_PAGE.read_text())


async def hosted_session(request: Request) -> JSONResponse:
    session = await _session(request, _session_id(request.path_params["session_id"]))
    return JSONResponse({key: session.get(key) for key in ("id", "mode", "amount_total", "currency", "status")})


async def hosted_pay(request: Request) -> JSONResponse:
    """The customer pays on the hosted page; on success, where Stripe would send them."""
    session_id = _session_id(request.path_params["session_id"])
    await _session(request, session_id)
    body = await json_body(request)
    method = HOSTED_METHODS.get(str(body.get("method")))
    if method is None:
        raise ApiError(400, "bad_request", f"method is one of {sorted(HOSTED_METHODS)}")
    async with _stripe(request) as stripe:
        done = await stripe.post(f"/v1/checkout/sessions/{session_id}/_complete", data=method)
    if not done.is_success:  # a decline (402), or a session no longer open (400), as Stripe's page says
        error = done.json().get("error") or {}
        return JSONResponse({"error": {"code": error.get("code") or ("card_declined" if done.status_code == 402
                                                                     else "bad_request"),
                                       "message": error.get("message") or "refused"}},
                            status_code=402 if done.status_code == 402 else 400)
    session = done.json()
    return JSONResponse({"redirect": session["success_url"].replace("{CHECKOUT_SESSION_ID}", quote(session_id))})


async def return_page(request: Request) -> Response:
    if not SESSION_ID.fullmatch(request.query_params.get("session_id", "")):
        return RedirectResponse("/demo", status_code=303)
    return HTMLResponse(with_sdk_check(RETURN_PAGE.read_text()))


async def session_token(request: Request) -> JSONResponse:
    """The merchant backend: a stream token for the session the customer returned from (a
    real backend checks first that the session is this customer's)."""
    session_id = _session_id(request.query_params.get("session_id"))
    await _session(request, session_id)
    settings = request.app.state.settings
    token, _ = tokens.mint(settings.paystream_token_secret, txn=[session_id], ttl_seconds=min(600, settings.max_token_ttl))
    return JSONResponse({"token": token})


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
    Route("/demo/api/subscribe", subscribe, methods=["POST"]),
    Route("/demo/api/hosted", hosted, methods=["POST"]),
    Route("/demo/api/session-token", session_token),
    Route("/demo/hosted/{session_id}", hosted_page),
    Route("/demo/hosted/{session_id}/session", hosted_session),
    Route("/demo/hosted/{session_id}/pay", hosted_pay, methods=["POST"]),
    Route("/demo/return", return_page),
]


def create_app() -> Starlette:
    """`paystream dev`'s app: the production app with the /demo routes (unauthenticated)."""
    import logging

    from paystream.app import create_app as create_production_app

    app = create_production_app(extra_routes=routes)
    if sdk_bundle() is None:
        logging.getLogger("paystream.demo").warning(NO_SDK)
    return app
