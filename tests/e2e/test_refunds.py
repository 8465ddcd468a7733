"""Refunds through paystream (issue 24, section 1): stored with their own states, listed
in the transaction's JSON, pushed; never more than was captured, even concurrently, with
or without one Idempotency-Key; what cannot be refunded never reaches Stripe; refunds
made elsewhere are adopted from their events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from paystream.dev import trigger
from paystream.dev.localstripe import LocalStripe
from tests.support import Paystream, StripeJs, wait_until

pytestmark = pytest.mark.e2e

VISA = "4242424242424242"


@pytest.fixture
async def stripe_js(local_stripe: LocalStripe) -> AsyncIterator[StripeJs]:
    async with StripeJs(local_stripe.url) as js:
        yield js


async def paid(ps: Paystream, stripe_js: StripeJs, amount: int = 1500) -> dict:
    resp = await ps.http.post("/v1/transactions", headers=ps.backend,
                              json={"kind": "payment", "amount": amount, "currency": "usd"})
    assert resp.status_code == 201, resp.text
    created = resp.json()
    assert (await stripe_js.pay(created["transaction"]["stripe_id"], VISA)).status_code == 200

    async def succeeded() -> bool:
        return (await ps.get(created["transaction"]["id"])).json()["status"] == "succeeded"
    await wait_until(succeeded, timeout=15, what="the payment's success webhook")
    return created


async def refund(ps: Paystream, txn: str, body: dict | None = None, key: str | None = None):  # noqa: ANN201
    headers = {**ps.backend, **({"Idempotency-Key": key} if key else {})}
    return await ps.http.post(f"/v1/transactions/{txn}/refunds", headers=headers, json=body or {})


async def refunds_at_stripe(stripe_js: StripeJs, pi: str) -> list[dict]:
    return (await stripe_js.http.get("/v1/refunds", params={"payment_intent": pi, "limit": 100})).json()["data"]


async def test_refunds_are_recorded_pushed_and_bounded(ps: Paystream, stripe_js: StripeJs) -> None:
    created = await paid(ps, stripe_js)
    txn, pi = created["transaction"]["id"], created["transaction"]["stripe_id"]
    first = await refund(ps, txn, {"amount": 500, "reason": "requested_by_customer", "metadata": {"ticket": "7"}})
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["refund"]["status"] == "succeeded" and body["refund"]["amount"] == 500
    assert body["refund"]["id"].startswith("rf_") and body["refund"]["stripe_id"].startswith("re_")
    assert (body["transaction"]["status"], body["transaction"]["amount_refunded"]) == ("partially_refunded", 500)
    assert [r["id"] for r in body["transaction"]["refunds"]] == [body["refund"]["id"]]
    # Logged and pushed (a stream resuming from the success's seq gets it).
    async with ps.sse(txn, token=created["stream_token"], last_event_id=body["transaction"]["seq"] - 1) as stream:
        pushed = await stream.event()
    assert pushed is not None and pushed.json["status"] == "partially_refunded"
    assert pushed.json["cause"]["type"] == "paystream.refund"
    assert pushed.json["refunds"][0]["reason"] == "requested_by_customer"
    rest = await refund(ps, txn)  # no amount: what is left
    assert rest.status_code == 201, rest.text
    assert rest.json()["refund"]["amount"] == 1000
    assert (rest.json()["transaction"]["status"], rest.json()["transaction"]["amount_refunded"]) == ("refunded", 1500)
    more = await refund(ps, txn, {"amount": 1})
    assert more.status_code == 400 and more.json()["error"]["code"] == "refund_exceeds_captured"
    at_stripe = await refunds_at_stripe(stripe_js, pi)
    assert sorted(r["amount"] for r in at_stripe) == [500, 1000]  # the refused one never reached Stripe
    assert {r["metadata"]["paystream_refund_id"] for r in at_stripe} == {r["id"] for r in
                                                                          (await ps.get(txn)).json()["refunds"]}


async def test_what_cannot_be_refunded_is_refused_before_stripe(ps: Paystream, stripe_js: StripeJs) -> None:
    created = await paid(ps, stripe_js)
    txn, pi = created["transaction"]["id"], created["transaction"]["stripe_id"]
    over = await refund(ps, txn, {"amount": 1501})
    assert over.status_code == 400 and over.json()["error"]["code"] == "refund_exceeds_captured"
    for bad in ({"amount": 0}, {"reason": "because"}, {"metadata": {"paystream_refund_id": "x"}}, {"extra": 1}):
        assert (await refund(ps, txn, bad)).status_code == 400, bad
    unpaid = await ps.http.post("/v1/transactions", headers=ps.backend,
                                json={"kind": "payment", "amount": 900, "currency": "usd"})
    nothing = await refund(ps, unpaid.json()["transaction"]["id"])
    assert nothing.status_code == 409 and nothing.json()["error"]["code"] == "not_refundable"
    assert (await refund(ps, "txn_01HZZZZZZZZZZZZZZZZZZZZZZZ")).status_code == 404
    assert await refunds_at_stripe(stripe_js, pi) == []
    assert (await ps.get(txn)).json()["refunds"] == []


async def test_concurrent_refunds_never_exceed_what_was_captured(
        ps: Paystream, stripe_js: StripeJs, db: asyncpg.Connection) -> None:
    created = await paid(ps, stripe_js)
    txn, pi = created["transaction"]["id"], created["transaction"]["stripe_id"]
    answers = await asyncio.gather(*(refund(ps, txn, {"amount": 500}) for _ in range(8)))
    assert sorted(a.status_code for a in answers) == [201] * 3 + [400] * 5, [a.text for a in answers]
    assert sum(r["amount"] for r in await refunds_at_stripe(stripe_js, pi)) == 1500
    state = (await ps.get(txn)).json()
    assert (state["status"], state["amount_refunded"], len(state["refunds"])) == ("refunded", 1500, 3)
    assert await db.fetchval("SELECT sum(amount) FROM refunds WHERE transaction_id = $1", txn) == 1500


async def test_one_idempotency_key_is_one_refund(ps: Paystream, stripe_js: StripeJs) -> None:
    created = await paid(ps, stripe_js)
    txn, pi = created["transaction"]["id"], created["transaction"]["stripe_id"]
    answers = await asyncio.gather(*(refund(ps, txn, {"amount": 400}, key="refund-once") for _ in range(8)))
    assert {a.status_code for a in answers} == {201}, [a.text for a in answers]
    assert len({a.json()["refund"]["id"] for a in answers}) == 1
    assert [r["amount"] for r in await refunds_at_stripe(stripe_js, pi)] == [400]
    reused = await refund(ps, txn, {"amount": 401}, key="refund-once")
    assert reused.status_code == 400 and reused.json()["error"]["code"] == "idempotency_key_reused"


async def test_refunds_made_elsewhere_are_adopted_and_a_failure_is_pushed(ps: Paystream) -> None:
    pi = trigger.stripe_id("pi_")
    await ps.deliver(ps.event("payment_intent.succeeded", pi, amount=3000))
    made_in_dashboard = {"id": trigger.stripe_id("re_"), "object": "refund", "amount": 1200, "currency": "usd",
                         "payment_intent": pi, "charge": trigger.stripe_id("ch_"), "metadata": {},
                         "reason": None, "status": "pending"}
    await ps.deliver(trigger.envelope("refund.created", made_in_dashboard))
    state = (await ps.get(pi)).json()
    assert [(r["stripe_id"], r["status"]) for r in state["refunds"]] == [(made_in_dashboard["id"], "pending")]
    assert state["status"] == "succeeded"
    succeeded = {**made_in_dashboard, "status": "succeeded"}
    for _ in range(2):  # a duplicate changes nothing
        await ps.deliver(trigger.envelope("refund.updated", succeeded))
    state = (await ps.get(pi)).json()
    assert (state["status"], state["amount_refunded"]) == ("partially_refunded", 1200)
    assert [r["status"] for r in state["refunds"]] == ["succeeded"]
    late = await ps.deliver(trigger.envelope("refund.created", made_in_dashboard))  # older news
    assert late["outcome"] == "no_change"
    failed = {**made_in_dashboard, "status": "failed", "failure_reason": "expired_or_canceled_card"}
    await ps.deliver(trigger.envelope("refund.failed", failed))
    state = (await ps.get(pi)).json()
    assert [r["status"] for r in state["refunds"]] == ["failed"]
    assert state["last_error"]["code"] == "refund_failed"
    assert state["refunds"][0]["failure_reason"] == "expired_or_canceled_card"
