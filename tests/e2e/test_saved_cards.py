"""Saved cards (issue 23 section 5), end to end through a real `paystream serve` and the
emulator: a payment keeps its card (setup_future_usage), the backend lists the
customer's cards and charges one without the customer; a decline is 402 with the attempt
logged, a card that needs its holder is requires_action with the client secret the page
needs, and a card that is not the customer's is refused before anything is stored."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from paystream.dev.localstripe import LocalStripe
from tests.conftest import Server
from tests.support import Paystream, StripeJs, statuses_until, wait_until

pytestmark = pytest.mark.e2e

VISA, THREE_D_SECURE, DECLINED = "4242424242424242", "4000000000003220", "4000000000000341"


@pytest.fixture
async def ps(server: Server) -> AsyncIterator[Paystream]:
    async with Paystream(server) as client:
        yield client


@pytest.fixture
async def stripe_js(local_stripe: LocalStripe) -> AsyncIterator[StripeJs]:
    async with StripeJs(local_stripe.url) as js:
        yield js


async def saved_card(js: StripeJs, customer: str, number: str) -> str:
    """A card the customer saved earlier (Stripe.js creates it, the merchant attaches it)."""
    pm = await js.http.post("/v1/payment_methods", data={
        "type": "card", "card[number]": number, "card[exp_month]": "11", "card[exp_year]": "2031",
        "card[cvc]": "123"})
    assert pm.status_code == 200, pm.text
    attached = await js.http.post(f"/v1/payment_methods/{pm.json()['id']}/attach", data={"customer": customer})
    assert attached.status_code == 200, attached.text
    return pm.json()["id"]


async def charge(ps: Paystream, customer: str, pm: str, amount: int = 4200):
    return await ps.http.post("/v1/transactions", headers=ps.backend, json={
        "kind": "payment", "amount": amount, "currency": "usd", "customer_id": customer,
        "payment_method": pm, "off_session": True, "confirm": True})


async def test_a_payment_keeps_its_card_which_is_listed_and_charged_off_session(
        ps: Paystream, stripe_js: StripeJs) -> None:
    customer = await stripe_js.customer()
    cards = await ps.http.get(f"/v1/customers/{customer}/payment-methods", headers=ps.backend)
    assert (cards.status_code, cards.json()) == (200, {"data": []})

    created = await ps.http.post("/v1/transactions", headers=ps.backend, json={
        "kind": "payment", "amount": 1500, "currency": "usd", "customer_id": customer,
        "setup_future_usage": "off_session"})
    assert created.status_code == 201, created.text
    txn = created.json()["transaction"]
    pi = (await ps.get(txn["id"])).json()["stripe_id"]
    assert (await stripe_js.payment_intent(pi))["setup_future_usage"] == "off_session"
    async with ps.sse(txn["id"], token=created.json()["stream_token"]) as stream:
        await stream.event()
        assert (await stripe_js.pay(pi, VISA)).status_code == 200
        await statuses_until(stream, "succeeded")

    cards = await ps.http.get(f"/v1/customers/{customer}/payment-methods", headers=ps.backend)
    assert cards.status_code == 200, cards.text
    [card] = cards.json()["data"]
    assert card["id"].startswith("pm_")
    assert {k: card[k] for k in ("brand", "last4", "exp_month", "exp_year")} == {
        "brand": "visa", "last4": "4242", "exp_month": 12, "exp_year": 2030}

    # Next month, from the backend, without the customer.
    charged = await charge(ps, customer, card["id"])
    assert charged.status_code == 201, charged.text
    off = charged.json()["transaction"]
    assert (off["status"], off["amount"], off["customer_id"]) == ("succeeded", 4200, customer)
    assert off["stripe_id"].startswith("pi_") and off["stripe_id"] != pi
    stripe_pi = await stripe_js.payment_intent(off["stripe_id"])
    assert (stripe_pi["status"], stripe_pi["payment_method"]) == ("succeeded", card["id"])
    # Pushed as usual: the customer's stream has it, and Stripe's own event changes nothing.
    async with ps.sse(off["id"], token=ps.token(cus=customer)) as stream:
        snapshot = await stream.event()
        assert snapshot.json["status"] == "succeeded"

    async def webhook_arrived() -> bool:
        return await _event_seen(ps, off["id"], "payment_intent.succeeded")

    await wait_until(webhook_arrived, timeout=20, what="Stripe's payment_intent.succeeded")
    assert (await ps.get(off["id"])).json()["status"] == "succeeded"


async def _event_seen(ps: Paystream, txn_id: str, etype: str) -> bool:
    conn = await asyncpg.connect(ps.server.database_url)
    try:
        return bool(await conn.fetchval(
            "SELECT count(*) FROM stripe_events WHERE type = $1 AND transaction_id = $2", etype, txn_id))
    finally:
        await conn.close()


async def test_a_declined_saved_card_is_402_with_the_attempt_logged(ps: Paystream, stripe_js: StripeJs) -> None:
    customer = await stripe_js.customer()
    pm = await saved_card(stripe_js, customer, DECLINED)
    resp = await charge(ps, customer, pm, 3100)
    assert resp.status_code == 402, resp.text
    error = resp.json()["error"]
    assert error["code"] == "card_declined" and error["transaction_id"].startswith("txn_")
    logged = (await ps.get(error["transaction_id"])).json()
    assert (logged["status"], logged["amount"], logged["customer_id"]) == ("requires_payment_method", 3100, customer)
    assert logged["last_error"]["code"] == "card_declined"


async def test_a_card_that_needs_its_holder_is_requires_action_with_the_client_secret(
        ps: Paystream, stripe_js: StripeJs) -> None:
    customer = await stripe_js.customer()
    pm = await saved_card(stripe_js, customer, THREE_D_SECURE)
    resp = await charge(ps, customer, pm, 5000)
    assert resp.status_code == 201, resp.text
    txn, secret = resp.json()["transaction"], resp.json()["client_secret"]
    assert txn["status"] == "requires_action"
    assert txn["last_error"]["code"] == "authentication_required"
    assert txn["last_error"]["client_secret"] == secret and secret.startswith(txn["stripe_id"])
    # The customer's page hears it on their stream, client secret included, brings them
    # back to authenticate, and hears the success.
    async with ps.sse(txn["id"], token=ps.token(cus=customer)) as stream:
        snapshot = (await stream.event()).json
        assert snapshot["status"] == "requires_action"
        assert snapshot["last_error"]["client_secret"] == secret
        assert (await stripe_js.authenticate(txn["stripe_id"], snapshot["last_error"]["client_secret"])
                ).status_code == 200
        assert (await statuses_until(stream, "succeeded"))[-1]["previous_status"] == "requires_action"


async def test_a_card_that_is_not_the_customers_is_refused_and_nothing_is_stored(
        ps: Paystream, stripe_js: StripeJs) -> None:
    owner, other = await stripe_js.customer(), await stripe_js.customer()
    pm = await saved_card(stripe_js, owner, VISA)
    for card in (pm, "pm_doesnotexist123"):
        resp = await charge(ps, other, card)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["code"] == "payment_method_not_attached"
    conn = await asyncpg.connect(ps.server.database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM transactions WHERE customer_id = $1", other) == 0
    finally:
        await conn.close()
    # and the card is still only its owner's
    assert (await stripe_js.http.get(f"/v1/payment_methods/{pm}")).json()["customer"] == owner


@pytest.mark.parametrize(("body", "says"), [
    ({"payment_method": "pm_x", "off_session": True}, "confirm: true"),
    ({"payment_method": "pm_x", "confirm": True, "off_session": True, "customer_id": None}, "customer_id"),
    ({"off_session": True, "confirm": True}, "payment_method"),
    ({"setup_future_usage": "off_session", "customer_id": None}, "needs customer_id"),
    ({"setup_future_usage": "sometimes"}, "setup_future_usage"),
    ({"kind": "invoice", "setup_future_usage": "on_session"}, "setup_future_usage"),
])
async def test_bad_saved_card_requests_are_precise_400s(ps: Paystream, body: dict, says: str) -> None:
    full = {"kind": "payment", "amount": 100, "currency": "usd", "customer_id": "cus_someone", **body}
    resp = await ps.http.post("/v1/transactions", headers=ps.backend,
                              json={k: v for k, v in full.items() if v is not None})
    assert resp.status_code == 400, resp.text
    assert says in resp.text


async def test_listing_cards_needs_the_api_key_and_a_known_customer(ps: Paystream, server: Server) -> None:
    anon = await ps.http.get("/v1/customers/cus_nobody/payment-methods")
    assert anon.status_code == 401
    unknown = await ps.http.get("/v1/customers/cus_nobody123/payment-methods", headers=ps.backend)
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "customer_not_found")
    bad = await ps.http.get("/v1/customers/nobody/payment-methods", headers=ps.backend)
    assert bad.status_code == 400
