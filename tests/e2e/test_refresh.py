"""POST /v1/transactions/{id}/refresh (issue 12): the page a customer lands on reads the
outcome from Stripe at once, through the same state machine and effects as a webhook;
the webhook arriving a second later changes nothing; reads are bounded."""

from __future__ import annotations

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


async def test_refresh_pushes_the_outcome_before_the_webhook_which_then_changes_nothing(
        ps: Paystream, stripe_js: StripeJs, db: asyncpg.Connection) -> None:
    customer = await stripe_js.customer()
    resp = await ps.http.post("/v1/transactions", headers=ps.backend,
                              json={"kind": "wallet_top_up", "amount": 1200, "currency": "usd",
                                    "customer_id": customer})
    created = resp.json()
    txn_id, pi, token = created["transaction"]["id"], created["transaction"]["stripe_id"], created["stream_token"]
    async with ps.sse(txn_id, token=token) as stream:
        assert (await stream.event()).event == "snapshot"
        assert (await stripe_js.pay(pi, VISA)).status_code == 200
        # localstripe posts its webhook about a second late: the refresh is first.
        answer = await ps.http.post(f"/v1/transactions/{txn_id}/refresh",
                                    headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["changed"] is True and answer.json()["transaction"]["status"] == "succeeded"
        pushed = await stream.event()
        assert pushed.json["status"] == "succeeded"
        assert pushed.json["cause"] == {"stripe_event_id": None, "type": "paystream.refresh"}
        assert pushed.json["balance"]["amount"] == 1200  # the same effects as a webhook
    seq = pushed.json["seq"]

    async def webhook_arrived() -> bool:
        return await db.fetchval(
            """SELECT count(*) FROM stripe_events WHERE object_id = $1 AND type = 'payment_intent.succeeded'
                AND processed_at IS NOT NULL""", pi) > 0

    await wait_until(webhook_arrived, timeout=15, what="localstripe's late webhook")
    assert await db.fetchval("SELECT outcome FROM stripe_events WHERE object_id = $1"
                             " AND type = 'payment_intent.succeeded'", pi) == "no_change"
    assert (await ps.get(txn_id)).json()["seq"] == seq
    assert await db.fetchval("SELECT count(*) FROM ledger_entries WHERE transaction_id = $1", txn_id) == 2


async def test_a_third_refresh_within_two_seconds_is_429_with_retry_after(
        ps: Paystream, stripe_js: StripeJs) -> None:
    """Two in a row pass (Pay's refresh, then the one after 3-D Secure, issue 22)."""
    resp = await ps.http.post("/v1/transactions", headers=ps.backend,
                              json={"kind": "payment", "amount": 900, "currency": "usd"})
    txn_id = resp.json()["transaction"]["id"]
    for _ in range(2):
        first = await ps.http.post(f"/v1/transactions/{txn_id}/refresh", headers=ps.backend)
        assert first.status_code == 200 and first.json()["changed"] is False
    again = await ps.http.post(f"/v1/transactions/{txn_id}/refresh", headers=ps.backend)
    assert again.status_code == 429 and again.json()["error"]["code"] == "too_many_requests"
    assert 1 <= int(again.headers["retry-after"]) <= 2


async def test_refresh_answers_502_when_stripe_refuses_and_changes_nothing(ps: Paystream) -> None:
    pi = trigger.stripe_id("pi_")  # known from a webhook only: localstripe has no such object
    await ps.deliver(ps.event("payment_intent.processing", pi))
    before = (await ps.get(pi)).json()
    resp = await ps.http.post(f"/v1/transactions/{pi}/refresh", headers={"Authorization": f"Bearer {ps.token(pi)}"})
    assert resp.status_code == 502, resp.text
    after = (await ps.get(pi)).json()
    assert (after["status"], after["seq"]) == (before["status"], before["seq"])


async def test_refresh_needs_a_token_that_covers_the_transaction(ps: Paystream) -> None:
    pi = trigger.stripe_id("pi_")
    await ps.deliver(ps.event("payment_intent.processing", pi))
    other = await ps.http.post(f"/v1/transactions/{pi}/refresh",
                               headers={"Authorization": f"Bearer {ps.token('pi_other')}"})
    assert other.status_code == 403
    none = await ps.http.post(f"/v1/transactions/{pi}/refresh")
    assert none.status_code == 401
