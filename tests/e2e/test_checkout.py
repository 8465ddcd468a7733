"""Stripe Checkout and Payment Links (issue 23 section 4): kind "checkout" end to end
through a real server and the emulator's Checkout Sessions (tests/stripe_emulator/
checkout.py), whose test-only _complete stands in for the customer on Stripe's page."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
import stripe

from paystream.dev import trigger
from paystream.dev.localstripe import LocalStripe
from tests.support import Paystream, fixture_event, wait_until, webhooks_held
from tests.support import statuses_until as until

pytestmark = pytest.mark.e2e

VISA, DECLINED = "4242424242424242", "4000000000000341"
IBAN_OK, IBAN_FAILS = "DE89370400440532013000", "DE62370400440532013001"
URLS = {"success_url": "https://shop.example/return?session_id={CHECKOUT_SESSION_ID}",
        "cancel_url": "https://shop.example/cart"}


class Customer:
    """The customer on Stripe's hosted page (the emulator's test-only endpoint)."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, timeout=15,
                                      headers={"Authorization": "Bearer sk_test_paystream"})

    async def complete(self, session: str, **how: str) -> httpx.Response:
        return await self.http.post(f"/v1/checkout/sessions/{session}/_complete", data=how)


@pytest.fixture
async def customer(local_stripe: LocalStripe) -> AsyncIterator[Customer]:
    c = Customer(local_stripe.url)
    yield c
    await c.http.aclose()


@pytest.fixture
def merchant(local_stripe: LocalStripe) -> stripe.StripeClient:
    """The merchant's own Stripe calls (Payment Links, its own code), not paystream's."""
    return stripe.StripeClient("sk_test_merchant", base_addresses={"api": local_stripe.url},
                               http_client=stripe.HTTPXClient(timeout=15))


async def create(ps: Paystream, **body: Any) -> dict[str, Any]:
    resp = await ps.http.post("/v1/transactions", headers=ps.backend, json={"kind": "checkout", **URLS, **body})
    assert resp.status_code == 201, resp.text
    return resp.json()


async def test_create_answers_the_hosted_page_and_paying_there_pushes_succeeded(
        ps: Paystream, customer: Customer, merchant: stripe.StripeClient, db: asyncpg.Connection) -> None:
    created = await create(ps, mode="payment", amount=3000, currency="usd", metadata={"order": "A-1"})
    txn = created["transaction"]
    session = txn["stripe_id"]
    assert session.startswith("cs_") and created["url"].endswith(session) and "client_secret" not in created
    assert (txn["kind"], txn["status"], txn["amount"], txn["session_status"], txn["payment_status"]) == (
        "checkout", "requires_payment_method", 3000, "open", "unpaid")
    at_stripe = await merchant.v1.checkout.sessions.retrieve_async(session)
    assert at_stripe.success_url == URLS["success_url"]  # {CHECKOUT_SESSION_ID} left for Stripe to fill
    assert at_stripe.metadata["transaction_id"] == txn["id"] and at_stripe.metadata["order"] == "A-1"
    async with ps.sse(txn["id"], token=created["stream_token"]) as stream:
        assert (await stream.event()).event == "snapshot"
        assert (await customer.complete(session, card=VISA)).status_code == 200
        pushed = await until(stream, "succeeded")
    last = pushed[-1]
    assert last["cause"]["type"] == "checkout.session.completed"
    assert (last["session_status"], last["payment_status"]) == ("complete", "paid")
    # Another kind's JSON is as before: no session fields.
    pi = (await merchant.v1.checkout.sessions.retrieve_async(session)).payment_intent
    payment = await wait_until(lambda: _found(ps, pi), what="the session's PaymentIntent adopted")
    assert payment["kind"] == "payment" and "session_status" not in payment

    async def paid_once() -> bool:
        # The money is the PaymentIntent's: its transaction posts it, the session (which
        # follows it) posts nothing of its own, so revenue is not counted twice.
        rows = await db.fetch("""SELECT transaction_id, sum(amount) AS amount FROM ledger_entries
                                  WHERE account = 'merchant:revenue' AND transaction_id = ANY($1)
                                  GROUP BY 1""", [txn["id"], payment["id"]])
        return [tuple(r) for r in rows] == [(payment["id"], 3000)]
    await wait_until(paid_once, what="the payment's revenue posted once, by its own transaction")


async def _found(ps: Paystream, any_id: str) -> dict[str, Any] | None:
    resp = await ps.get(any_id)
    return resp.json() if resp.status_code == 200 else None


async def test_a_declined_card_leaves_the_session_open(ps: Paystream, customer: Customer) -> None:
    created = await create(ps, mode="payment", amount=1500, currency="eur")
    session = created["transaction"]["stripe_id"]
    declined = await customer.complete(session, card=DECLINED)
    assert declined.status_code == 402
    assert (await customer.complete(session, card=VISA)).status_code == 200  # the customer tries again
    async with ps.sse(created["transaction"]["id"], token=created["stream_token"]) as stream:
        assert (await until(stream, "succeeded"))[-1]["payment_status"] == "paid"


async def test_an_expired_session_is_canceled(ps: Paystream, merchant: stripe.StripeClient) -> None:
    created = await create(ps, mode="payment", amount=2000, currency="usd")
    async with ps.sse(created["transaction"]["id"], token=created["stream_token"]) as stream:
        assert (await stream.event()).event == "snapshot"
        await merchant.v1.checkout.sessions.expire_async(created["transaction"]["stripe_id"])
        last = (await until(stream, "canceled"))[-1]
    assert last["cause"]["type"] == "checkout.session.expired"
    assert (last["session_status"], last["payment_status"], last["last_error"]) == ("expired", "unpaid", None)


@pytest.mark.parametrize(("iban", "outcome"), [(IBAN_OK, "succeeded"), (IBAN_FAILS, "canceled")])
async def test_a_delayed_payment_is_processing_then_settles(ps: Paystream, customer: Customer, iban: str,
                                                            outcome: str) -> None:
    created = await create(ps, mode="payment", amount=4200, currency="eur")
    async with ps.sse(created["transaction"]["id"], token=created["stream_token"]) as stream:
        assert (await stream.event()).event == "snapshot"
        assert (await customer.complete(created["transaction"]["stripe_id"], iban=iban)).status_code == 200
        pushed = await until(stream, outcome)
    assert [p["status"] for p in pushed] == ["processing", outcome]
    assert (pushed[0]["session_status"], pushed[0]["payment_status"]) == ("complete", "unpaid")
    last = pushed[-1]
    if outcome == "canceled":
        assert last["cause"]["type"] == "checkout.session.async_payment_failed"
        assert last["last_error"]["code"] == "async_payment_failed"
        assert (last["session_status"], last["payment_status"]) == ("complete", "unpaid")
    else:
        assert last["cause"]["type"] == "checkout.session.async_payment_succeeded"
        assert last["payment_status"] == "paid"


async def test_the_return_page_refreshes_to_succeeded_before_the_webhook(
        ps: Paystream, customer: Customer, local_stripe: LocalStripe, db: asyncpg.Connection) -> None:
    created = await create(ps, mode="payment", amount=900, currency="usd")
    txn_id, session = created["transaction"]["id"], created["transaction"]["stripe_id"]
    async with webhooks_held(local_stripe.url):  # the refresh comes first
        assert (await customer.complete(session, card=VISA)).status_code == 200
        # The return page knows only the session id (success_url's {CHECKOUT_SESSION_ID}),
        # and the merchant mints a token for it.
        auth = {"Authorization": f"Bearer {ps.token(session)}"}
        answer = await ps.http.post(f"/v1/transactions/{session}/refresh", headers=auth)
        assert answer.status_code == 200, answer.text
        assert answer.json()["changed"] is True and answer.json()["transaction"]["status"] == "succeeded"
        read = await ps.http.get(f"/v1/transactions/{session}", headers=auth)
        assert read.status_code == 200 and read.json()["status"] == "succeeded"
        seq = read.json()["seq"]

    async def webhook_applied() -> bool:
        return bool(await db.fetchval("SELECT processed_at IS NOT NULL FROM stripe_events WHERE object_id = $1"
                                      " AND type = 'checkout.session.completed'", session))

    await wait_until(webhook_applied, timeout=15, what="the emulator's late webhook")
    assert await db.fetchval("SELECT outcome FROM stripe_events WHERE object_id = $1"
                             " AND type = 'checkout.session.completed'", session) == "no_change"
    assert (await ps.get(txn_id)).json()["seq"] == seq


async def test_a_session_made_elsewhere_is_adopted_from_its_first_event(
        ps: Paystream, customer: Customer, merchant: stripe.StripeClient) -> None:
    session = await merchant.v1.checkout.sessions.create_async(params={
        "mode": "payment", **URLS, "metadata": {"link": "plink_test"},
        "line_items": [{"quantity": 2, "price_data": {"currency": "usd", "unit_amount": 1250,
                                                       "product_data": {"name": "Poster"}}}]})
    assert (await ps.get(session.id)).status_code == 404  # nothing yet: no event
    assert (await customer.complete(session.id, card=VISA)).status_code == 200
    txn = await wait_until(lambda: _found(ps, session.id), timeout=15, what="the session adopted")
    assert (txn["kind"], txn["status"], txn["amount"], txn["currency"], txn["metadata"]) == (
        "checkout", "succeeded", 2500, "usd", {"link": "plink_test"})
    read = await ps.http.get(f"/v1/transactions/{session.id}", params={"token": ps.token(session.id)})
    assert read.status_code == 200 and read.json()["payment_status"] == "paid"


def _event(event_type: str, session: str, created: int, **fields: Any) -> dict[str, Any]:
    """A real checkout.session.* body (the fixture), for this session."""
    event = fixture_event("checkout.session.completed__stripe-ruby-mock", type=event_type, created=created)
    event["data"]["object"].update({"id": session, "metadata": {}, "customer": None, "payment_intent": None,
                                    **fields})
    return event


SEQUENCES = {
    "delayed, then paid": ([("checkout.session.completed", "complete", "unpaid"),
                            ("checkout.session.async_payment_succeeded", "complete", "paid")], "succeeded"),
    "delayed, then failed": ([("checkout.session.completed", "complete", "unpaid"),
                              ("checkout.session.async_payment_failed", "complete", "unpaid")], "canceled"),
    "paid at once, a late duplicate of nothing else": ([("checkout.session.completed", "complete", "paid")],
                                                       "succeeded"),
    "expired": ([("checkout.session.expired", "expired", "unpaid")], "canceled"),
}


@pytest.mark.parametrize("name", list(SEQUENCES))
async def test_any_order_and_duplicates_of_a_sessions_events_end_the_same(
        name: str, ps: Paystream, db: asyncpg.Connection) -> None:
    steps, expected = SEQUENCES[name]
    outcomes = set()
    for order in itertools.permutations(range(len(steps))):
        session = trigger.stripe_id("cs_test_")
        base = int(time.time()) - 100
        # The second step may share the first's second (Stripe's whole-second `created`).
        events = [_event(t, session, base + (k if name != "delayed, then failed" else 0), status=s,
                         payment_status=p) for k, (t, s, p) in enumerate(steps)]
        for i in order:
            await ps.deliver(events[i])
            await ps.deliver(events[i])
        txn = (await ps.get(session)).json()
        log = await db.fetch("SELECT seq, status FROM transaction_events WHERE transaction_id = $1 ORDER BY seq",
                             txn["id"])
        assert [r["seq"] for r in log] == list(range(1, txn["seq"] + 1))
        outcomes.add((txn["status"], json.dumps(txn["last_error"]), txn["session_status"], txn["payment_status"]))
    assert len(outcomes) == 1, outcomes
    assert next(iter(outcomes))[0] == expected


async def test_bad_input_is_a_precise_400_and_stores_nothing_wrong(
        ps: Paystream, merchant: stripe.StripeClient, db: asyncpg.Connection) -> None:
    plan = f"price_{trigger.stripe_id('m')[2:]}"
    await merchant.v1.plans.create_async(params={"id": plan, "amount": 900, "currency": "usd", "interval": "month",
                                                 "product": {"name": "Monthly"}})
    # Each refused request carries this mark: a row stored for one would too (another
    # test's late Payment Link event may add a checkout transaction of its own meanwhile).
    mark = {"metadata": {"refused_test": trigger.stripe_id("m")}}
    marked = "SELECT count(*) FROM transactions WHERE metadata = $1::jsonb"
    refused = {
        "no mode": {"amount": 100},
        "no success_url": {"mode": "payment", "amount": 100, "success_url": None},
        "no cancel_url": {"mode": "payment", "amount": 100, "cancel_url": None},
        "a relative url": {"mode": "payment", "amount": 100, "success_url": "/return"},
        "amount and price": {"mode": "payment", "amount": 100, "price": plan},
        "subscription without a price": {"mode": "subscription", "amount": 100},
        "setup with an amount": {"mode": "setup", "amount": 100},
        "capture_method": {"mode": "payment", "amount": 100, "capture_method": "manual"},
    }
    for why, body in refused.items():
        payload = {"kind": "checkout", **URLS, **mark, **body}
        for key in [k for k, v in payload.items() if v is None]:
            del payload[key]
        resp = await ps.http.post("/v1/transactions", headers=ps.backend, json=payload)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "bad_request", (why, resp.text)
    payment = await ps.http.post("/v1/transactions", headers=ps.backend,
                                 json={"kind": "payment", "amount": 100, "success_url": URLS["success_url"], **mark})
    assert payment.status_code == 400 and "checkout only" in payment.json()["error"]["message"]
    assert await db.fetchval(marked, json.dumps(mark["metadata"])) == 0

    # What only Stripe knows: the answer names it, and the transaction shows Stripe's refusal.
    for body, code in (({"mode": "payment", "price": "price_nosuch"}, "unknown_price"),
                       ({"mode": "payment", "amount": 100, "customer_id": "cus_nosuch"}, "unknown_customer"),
                       ({"mode": "payment", "price": plan}, "stripe_invalid_request")):  # recurring in payment mode
        resp = await ps.http.post("/v1/transactions", headers=ps.backend, json={"kind": "checkout", **URLS, **body})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == code, resp.text
        row = await db.fetchrow("SELECT stripe_id, status, last_error FROM transactions WHERE id = $1",
                                resp.json()["error"]["transaction_id"])
        assert row["stripe_id"] is None and row["status"] == "requires_payment_method"
    subscription = await create(ps, mode="subscription", price=plan)
    assert subscription["transaction"]["amount"] == 900 and subscription["url"]


async def test_a_token_for_the_session_reads_its_payment_and_hears_its_refund(
        ps: Paystream, customer: Customer, merchant: stripe.StripeClient) -> None:
    created = await create(ps, mode="payment", amount=5000, currency="usd")
    txn_id, session = created["transaction"]["id"], created["transaction"]["stripe_id"]
    token = ps.token(session)
    assert (await customer.complete(session, card=VISA)).status_code == 200
    pi = (await merchant.v1.checkout.sessions.retrieve_async(session)).payment_intent
    payment = await wait_until(lambda: _found(ps, pi), timeout=15, what="the PaymentIntent adopted")
    await wait_until(lambda: _status(ps, txn_id, "succeeded"), timeout=15, what="the session's webhook")
    for any_id in (pi, payment["id"]):
        read = await ps.http.get(f"/v1/transactions/{any_id}", headers={"Authorization": f"Bearer {token}"})
        assert read.status_code == 200 and read.json()["stripe_id"] == pi, read.text
    stranger = await ps.http.get(f"/v1/transactions/{pi}", headers={"Authorization": f"Bearer {ps.token('cs_other')}"})
    assert stranger.status_code == 403
    async with ps.sse(session, token=token, params={"follow": "true"}) as stream:  # past success
        assert (await stream.event()).event == "snapshot"
        await ps.deliver(ps.event("charge.refunded", pi, amount=5000, amount_refunded=5000))
        last = (await until(stream, "refunded"))[-1]
    assert last["amount_refunded"] == 5000 and last["cause"]["type"] == "charge.refunded"
    assert (await ps.get(pi)).json()["status"] == "refunded"


async def test_a_refund_that_lands_before_the_session_event_reaches_its_watcher(ps: Paystream) -> None:
    pi, session = trigger.stripe_id("pi_"), trigger.stripe_id("cs_test_")
    base = int(time.time()) - 100
    await ps.deliver(ps.event("payment_intent.succeeded", pi, amount=700, created=base))
    await ps.deliver(ps.event("charge.refunded", pi, amount=700, amount_refunded=300, created=base + 5))
    completed = _event("checkout.session.completed", session, base + 1, status="complete", payment_status="paid",
                       amount_total=700, payment_intent=pi)
    await ps.deliver(completed)
    await ps.deliver(completed)
    txn = (await ps.get(session)).json()
    assert (txn["status"], txn["amount_refunded"]) == ("partially_refunded", 300)


async def _status(ps: Paystream, any_id: str, status: str) -> bool:
    return (await ps.get(any_id)).json()["status"] == status


async def test_the_emulators_events_have_stripes_shape(ps: Paystream, db: asyncpg.Connection,
                                                       customer: Customer) -> None:
    created = await create(ps, mode="payment", amount=1000, currency="usd")
    session = created["transaction"]["stripe_id"]
    assert (await customer.complete(session, card=VISA)).status_code == 200

    async def stored() -> str | None:
        return await db.fetchval("SELECT raw_body FROM stripe_events WHERE object_id = $1"
                                 " AND type = 'checkout.session.completed'", session)

    body = json.loads(await wait_until(stored, timeout=15, what="the completed event"))
    real = fixture_event("checkout.session.completed__stripe-ruby-mock")
    assert set(real) <= set(body) | {"pending_webhooks", "request"}
    assert set(real["data"]["object"]) <= set(body["data"]["object"])
