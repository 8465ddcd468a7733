"""Payment flows through the real chain: stripe-python → localstripe → signed webhook →
Postgres → NOTIFY → an SSE client.  Events localstripe never emits (requires_action,
amount_capturable_updated, canceled, refunds, disputes) are built and signed as
`paystream trigger` does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from paystream.dev.localstripe import LocalStripe
from tests.support import Paystream, StripeJs, statuses_until

pytestmark = pytest.mark.e2e

VISA, THREE_D_SECURE, DECLINED = "4242424242424242", "4000000000003220", "4000000000000341"


@pytest.fixture
async def stripe_js(local_stripe: LocalStripe) -> AsyncIterator[StripeJs]:
    async with StripeJs(local_stripe.url) as js:
        yield js


async def create(ps: Paystream, **body: object) -> dict:
    resp = await ps.http.post("/v1/transactions", json=body, headers=ps.backend)
    assert resp.status_code == 201, resp.text
    return resp.json()


async def test_a_card_payment_is_pushed_to_the_browser(ps: Paystream, stripe_js: StripeJs) -> None:
    created = await create(ps, kind="payment", amount=15000, currency="usd")
    txn = created["transaction"]
    assert (txn["status"], txn["kind"], txn["amount"]) == ("requires_payment_method", "payment", 15000)
    pi = (await ps.get(txn["id"])).json()["stripe_id"]
    assert pi.startswith("pi_") and created["client_secret"].startswith(pi)
    stripe_pi = await stripe_js.payment_intent(pi)
    assert stripe_pi["metadata"]["transaction_id"] == txn["id"]
    async with ps.sse(txn["id"], token=created["stream_token"]) as stream:
        assert (await stream.event()).event == "snapshot"
        assert (await stripe_js.pay(pi, VISA)).status_code == 200
        pushed = await statuses_until(stream, "succeeded")
    assert pushed[-1]["cause"]["type"] == "payment_intent.succeeded"
    assert pushed[-1]["cause"]["stripe_event_id"].startswith("evt_")


async def test_3d_secure_then_success(ps: Paystream, stripe_js: StripeJs) -> None:
    created = await create(ps, kind="payment", amount=2500, currency="eur")
    txn_id = created["transaction"]["id"]
    pi = (await ps.get(txn_id)).json()["stripe_id"]
    async with ps.sse(txn_id, token=created["stream_token"]) as stream:
        await stream.event()
        confirm = await stripe_js.pay(pi, THREE_D_SECURE)
        assert confirm.json()["status"] == "requires_action"
        await ps.deliver(ps.event("payment_intent.requires_action", pi, amount=2500, currency="eur",
                                  metadata={"transaction_id": txn_id}))
        assert (await statuses_until(stream, "requires_action"))[-1]["previous_status"] == "requires_payment_method"
        assert (await stripe_js.authenticate(pi, created["client_secret"])).status_code == 200
        assert (await statuses_until(stream, "succeeded"))[-1]["previous_status"] == "requires_action"


async def test_a_decline_is_pushed_and_a_retry_can_succeed(ps: Paystream, stripe_js: StripeJs) -> None:
    created = await create(ps, kind="payment", amount=4000, currency="usd")
    txn_id = created["transaction"]["id"]
    pi = (await ps.get(txn_id)).json()["stripe_id"]
    async with ps.sse(txn_id, token=created["stream_token"]) as stream:
        await stream.event()
        assert (await stripe_js.pay(pi, DECLINED)).status_code == 402
        declined = await stream.event(timeout=15)
        assert declined.json["status"] == "requires_payment_method"
        assert declined.json["last_error"]["code"] == "card_declined"
        # localstripe cannot confirm a PaymentIntent again after a declined charge, so the
        # retry's outcome arrives as Stripe would send it.
        await ps.deliver(ps.event("payment_intent.succeeded", pi, amount=4000))
        final = await statuses_until(stream, "succeeded")
    assert final[-1]["last_error"] is None


async def test_card_validation_is_held_then_released(ps: Paystream, stripe_js: StripeJs) -> None:
    created = await create(ps, kind="card_validation", currency="usd")
    txn = created["transaction"]
    assert (txn["amount"], txn["kind"]) == (100, "card_validation")
    pi = (await ps.get(txn["id"])).json()["stripe_id"]
    assert (await stripe_js.payment_intent(pi))["capture_method"] == "manual"
    async with ps.sse(txn["id"], token=created["stream_token"]) as stream:
        await stream.event()
        assert (await stripe_js.pay(pi, VISA)).json()["status"] == "requires_capture"
        await ps.deliver(ps.event("payment_intent.amount_capturable_updated", pi, amount=100,
                                  metadata={"transaction_id": txn["id"]}))
        held, released = await statuses_until(stream, "canceled")
    assert (held["status"], held["validated"]) == ("requires_capture", True)
    assert released["validated"] is True
    assert released["cause"] == {"stripe_event_id": None, "type": "paystream.card_validation.released"}
    assert (await stripe_js.payment_intent(pi))["status"] == "canceled"


async def test_refunds_partial_several_then_full_and_a_failed_refund(ps: Paystream, stripe_js: StripeJs) -> None:
    created = await create(ps, kind="payment", amount=3000, currency="usd")
    txn_id = created["transaction"]["id"]
    pi = (await ps.get(txn_id)).json()["stripe_id"]
    async with ps.sse(txn_id, token=created["stream_token"], params={"follow": "true"}) as stream:
        await stream.event()
        await stripe_js.pay(pi, VISA)
        await statuses_until(stream, "succeeded")
        for total in (500, 1200):
            await ps.deliver(ps.event("charge.refunded", pi, amount=3000, amount_refunded=total))
            push = await stream.event()
            assert (push.json["status"], push.json["amount_refunded"]) == ("partially_refunded", total)
        await ps.deliver(ps.event("charge.refunded", pi, amount=3000, amount_refunded=700))  # late: ignored
        failed = ps.event("charge.refunded", pi)
        failed.update(type="refund.failed")
        failed["data"]["object"] = {"id": "re_1", "object": "refund", "payment_intent": pi, "amount": 700,
                                    "status": "failed", "failure_reason": "expired_or_canceled_card"}
        await ps.deliver(failed)
        push = await stream.event()
        assert push.json["status"] == "partially_refunded"
        assert push.json["last_error"]["failure_reason"] == "expired_or_canceled_card"
        await ps.deliver(ps.event("charge.refunded", pi, amount=3000, amount_refunded=3000))
        assert (await stream.event()).json["status"] == "refunded"
        await ps.deliver(ps.event("charge.dispute.created", pi, amount=3000))
        assert (await stream.event()).json["status"] == "disputed"


async def test_idempotency_key_returns_the_first_answer(ps: Paystream, stripe_js: StripeJs,
                                                        db: asyncpg.Connection) -> None:
    headers = {**ps.backend, "Idempotency-Key": "order-42-" + ps.token("x")[-12:]}
    body = {"kind": "payment", "amount": 999, "currency": "usd", "metadata": {"order": "42"}}
    first = await ps.http.post("/v1/transactions", json=body, headers=headers)
    again = await ps.http.post("/v1/transactions", json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    txn_id = first.json()["transaction"]["id"]
    assert await db.fetchval("SELECT count(*) FROM transactions WHERE metadata->>'order' = '42'"
                             " AND id = $1", txn_id) == 1
    other = await ps.http.post("/v1/transactions", json={**body, "amount": 1000}, headers=headers)
    assert other.status_code == 400 and other.json()["error"]["code"] == "idempotency_key_reused"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"kind": "payment", "currency": "usd"}, "bad_request"),
        ({"kind": "loan", "amount": 5}, "bad_request"),
        ({"kind": "card_validation", "amount": 500}, "bad_request"),
        ({"kind": "wallet_top_up", "amount": 500}, "bad_request"),
        ({"kind": "payment", "amount": 5, "metadata": {"transaction_id": "txn_x"}}, "bad_request"),
        ({"kind": "payment", "amount": 5, "surprise": True}, "bad_request"),
        ({"kind": "card_validation", "coupon": "X"}, "bad_request"),  # found by schemathesis
    ],
)
async def test_bad_create_requests(ps: Paystream, body: dict, code: str) -> None:
    resp = await ps.http.post("/v1/transactions", json=body, headers=ps.backend)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == code


async def test_currency_is_taken_in_any_case_for_every_kind(ps: Paystream) -> None:
    created = await create(ps, kind="card_validation", currency="EUR")  # was a 500 (schemathesis)
    assert created["transaction"]["currency"] == "eur"


async def test_create_needs_the_api_key(ps: Paystream) -> None:
    resp = await ps.http.post("/v1/transactions", json={"kind": "payment", "amount": 5},
                              headers={"Authorization": f"Bearer {ps.token('x')}"})
    assert resp.status_code == 401


async def test_a_stripe_refusal_is_a_clear_error_and_is_recorded(ps: Paystream) -> None:
    resp = await ps.http.post("/v1/transactions", headers=ps.backend, json={
        "kind": "wallet_top_up", "amount": 500, "currency": "usd", "customer_id": "cus_doesnotexist"})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "stripe_invalid_request"
    txn = (await ps.get(error["transaction_id"])).json()
    assert txn["status"] == "requires_payment_method" and txn["last_error"]["code"] == "stripe_invalid_request"


async def test_manual_capture_then_capture_succeeds(ps: Paystream, stripe_js: StripeJs) -> None:
    created = await create(ps, kind="payment", amount=8000, currency="usd", capture_method="manual")
    txn_id = created["transaction"]["id"]
    pi = (await ps.get(txn_id)).json()["stripe_id"]
    async with ps.sse(txn_id, token=created["stream_token"]) as stream:
        await stream.event()
        assert (await stripe_js.pay(pi, VISA)).json()["status"] == "requires_capture"
        await ps.deliver(ps.event("payment_intent.amount_capturable_updated", pi, amount=8000,
                                  metadata={"transaction_id": txn_id}))
        held = await statuses_until(stream, "requires_capture")
        assert held[-1]["validated"] is False  # a payment, not a card validation: no release
        assert (await stripe_js.http.post(f"/v1/payment_intents/{pi}/capture")).status_code == 200
        assert (await statuses_until(stream, "succeeded"))[-1]["cause"]["type"] == "payment_intent.succeeded"


async def test_a_wallet_top_up_pushes_the_new_balance_to_a_customer_stream(
        ps: Paystream, stripe_js: StripeJs) -> None:
    customer = await stripe_js.customer()
    created = await create(ps, kind="wallet_top_up", amount=2500, currency="usd", customer_id=customer)
    txn_id = created["transaction"]["id"]
    pi = (await ps.get(txn_id)).json()["stripe_id"]
    async with ps.sse(txn_id, token=ps.token(cus=customer)) as stream:
        await stream.event()
        await stripe_js.pay(pi, VISA)
        done = (await statuses_until(stream, "succeeded"))[-1]
    assert done["balance"] == {"customer_id": customer, "amount": 2500, "currency": "usd"}


async def test_stripe_unreachable_is_a_502_and_recorded(database_url: str) -> None:
    from tests.conftest import Server
    from tests.harness import free_port

    server = await asyncio.to_thread(
        Server(database_url, {"STRIPE_API_BASE": f"http://127.0.0.1:{free_port()}"}).start)
    try:
        async with Paystream(server) as ps:
            resp = await ps.http.post("/v1/transactions", headers=ps.backend,
                                      json={"kind": "payment", "amount": 700, "currency": "usd"})
            assert resp.status_code == 502, resp.text
            error = resp.json()["error"]
            assert error["code"] == "stripe_unavailable"
            txn = (await ps.get(error["transaction_id"])).json()
            assert txn["last_error"]["code"] == "stripe_unavailable" and txn["stripe_id"] is None
    finally:
        server.stop()
