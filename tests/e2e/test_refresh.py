"""POST /v1/transactions/{id}/refresh (issue 12): the page a customer lands on reads the
outcome from Stripe at once, through the same state machine and effects as a webhook;
the webhook arriving a second later changes nothing; reads are bounded.  A subscription
(sub_) and a Checkout Session (cs_) whose webhooks were lost are read as what they are
(issue 23)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest

from paystream.dev import trigger
from paystream.dev.localstripe import LocalStripe
from tests.conftest import Server
from tests.e2e.new_kinds import DECLINED, IBAN_OK, URLS, Stripe, no_backfill, own_emulator
from tests.support import Paystream, StripeJs, wait_until, webhooks_held

pytestmark = pytest.mark.e2e

VISA = "4242424242424242"


@pytest.fixture
async def stripe_js(local_stripe: LocalStripe) -> AsyncIterator[StripeJs]:
    async with StripeJs(local_stripe.url) as js:
        yield js


async def test_refresh_pushes_the_outcome_before_the_webhook_which_then_changes_nothing(
        ps: Paystream, stripe_js: StripeJs, local_stripe: LocalStripe, db: asyncpg.Connection) -> None:
    customer = await stripe_js.customer()
    resp = await ps.http.post("/v1/transactions", headers=ps.backend,
                              json={"kind": "wallet_top_up", "amount": 1200, "currency": "usd",
                                    "customer_id": customer})
    created = resp.json()
    txn_id, pi, token = created["transaction"]["id"], created["transaction"]["stripe_id"], created["stream_token"]
    async with ps.sse(txn_id, token=token) as stream, contextlib.AsyncExitStack() as held:
        assert (await stream.event()).event == "snapshot"
        await held.enter_async_context(webhooks_held(local_stripe.url))  # the refresh is first
        assert (await stripe_js.pay(pi, VISA)).status_code == 200
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


# --- kinds subscription and checkout (issue 23), their webhooks lost ----------------------


@pytest.fixture
async def lost(database_url: str, db: asyncpg.Connection) -> AsyncIterator[tuple[Paystream, Stripe]]:
    """A server whose emulator's webhooks are all lost and whose backfill waits (so
    nothing but a refresh can tell it what Stripe knows), with the emulator's calls."""
    with own_emulator(lost=True) as emulator:
        server = Server(database_url, {"STRIPE_API_BASE": emulator.url, "PAYSTREAM_BACKFILL_INTERVAL": "86400"})
        async with no_backfill(db):
            await asyncio.to_thread(server.start)
            try:
                async with Paystream(server) as ps, Stripe(emulator.url) as stripe:
                    yield ps, stripe
            finally:
                server.stop()


async def refreshed(ps: Paystream, txn: str, token: str) -> dict:
    answer = await ps.http.post(f"/v1/transactions/{txn}/refresh", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.text
    return answer.json()


async def test_refresh_reads_a_subscription_whose_activation_and_renewal_failure_were_lost(
        lost: tuple[Paystream, Stripe]) -> None:
    """A sub_ is read as a subscription (not as a PaymentIntent, which Stripe answers 404):
    active once the page paid its first invoice, then past_due with the failed renewal's
    error and next retry, each pushed as a refresh."""
    ps, stripe = lost
    customer, price = await stripe.customer(), await stripe.monthly_price(2100)
    resp = await ps.http.post("/v1/transactions", headers=ps.backend, json={
        "kind": "subscription", "customer_id": customer, "price": price})
    assert resp.status_code == 201, resp.text
    created = resp.json()
    txn, token, secret = created["transaction"], created["stream_token"], created["client_secret"]
    sub = txn["stripe_id"]
    async with ps.sse(txn["id"], token=token) as stream:
        assert (await stream.event()).json["status"] == "incomplete"
        assert (await stripe.pay(secret.split("_secret_")[0], VISA))["status"] == "succeeded"
        assert (await stripe.http.get(f"/v1/subscriptions/{sub}")).json()["status"] == "active"
        assert (await ps.get(txn["id"])).json()["status"] == "incomplete"  # the webhooks are lost

        answer = await refreshed(ps, sub, token)
        assert answer["changed"] is True and answer["transaction"]["status"] == "active"
        pushed = (await stream.event()).json
        assert (pushed["status"], pushed["previous_status"], pushed["last_error"]) == ("active", "incomplete", None)
        assert pushed["cause"] == {"stripe_event_id": None, "type": "paystream.refresh"}
        assert pushed["current_period_end"] and pushed["cancel_at_period_end"] is False

        await stripe.default_card(customer, DECLINED)
        renewal = await stripe.post("/v1/invoices", customer=customer, subscription=sub)
        assert (await stripe.http.post(f"/v1/invoices/{renewal['id']}/pay")).status_code == 402
        assert (await stripe.http.get(f"/v1/subscriptions/{sub}")).json()["status"] == "past_due"
        answer = await refreshed(ps, txn["id"], token)
        assert answer["changed"] is True and answer["transaction"]["status"] == "past_due"
        pushed = (await stream.event()).json
        assert (pushed["status"], pushed["last_error"]["code"]) == ("past_due", "card_declined")
        assert pushed["next_payment_attempt"] is not None and pushed["cause"]["type"] == "paystream.refresh"


async def test_refresh_reads_checkout_sessions_whose_webhooks_were_lost(
        lost: tuple[Paystream, Stripe], db: asyncpg.Connection) -> None:
    """The return page's refresh of a cs_: processing while its delayed payment is unpaid,
    succeeded once Stripe has it paid; an expired session canceled; a subscription-mode
    session succeeded.  No webhook ever arrives."""
    ps, stripe = lost

    async def checkout(**body: object) -> dict:
        resp = await ps.http.post("/v1/transactions", headers=ps.backend, json={"kind": "checkout", **URLS, **body})
        assert resp.status_code == 201, resp.text
        return resp.json()["transaction"]

    delayed = await checkout(mode="payment", amount=4200, currency="eur")
    session = delayed["stripe_id"]
    token = ps.token(session)  # what the merchant mints for the return page, which knows the cs_ only
    async with ps.sse(session, token=token) as stream:
        assert (await stream.event()).json["status"] == "requires_payment_method"
        assert (await stripe.complete(session, iban=IBAN_OK))["payment_status"] == "unpaid"
        answer = await refreshed(ps, session, token)
        assert answer["changed"] is True
        assert (answer["transaction"]["status"], answer["transaction"]["session_status"]) == ("processing", "complete")
        pushed = (await stream.event()).json
        assert (pushed["status"], pushed["cause"]["type"]) == ("processing", "paystream.refresh")

        async def settled_at_stripe() -> bool:  # the emulator settles the debit moments later
            return (await stripe.http.get(f"/v1/checkout/sessions/{session}")).json()["payment_status"] == "paid"

        await wait_until(settled_at_stripe, timeout=15, what="the emulator to settle the debit")
        answer = await refreshed(ps, session, token)
        assert answer["changed"] is True and answer["transaction"]["payment_status"] == "paid"
        pushed = (await stream.event()).json
        assert (pushed["status"], pushed["previous_status"]) == ("succeeded", "processing")

        # The refresh linked the session to the PaymentIntent it made, as its webhook would
        # have: that PaymentIntent's refund, when its events come, reaches the session too.
        pi = (await stripe.http.get(f"/v1/checkout/sessions/{session}")).json()["payment_intent"]
        assert await db.fetchval("SELECT count(*) FROM transaction_follows WHERE stripe_id = $1"
                                 " AND transaction_id = $2", pi, delayed["id"]) == 1
        await ps.deliver(ps.event("payment_intent.succeeded", pi, amount=4200, currency="eur"))
        await ps.deliver(ps.event("charge.refunded", pi, amount=4200, currency="eur", amount_refunded=4200))
        assert (await ps.get(delayed["id"])).json()["status"] == "refunded"

    expiring = await checkout(mode="payment", amount=1000, currency="usd")
    await stripe.post(f"/v1/checkout/sessions/{expiring['stripe_id']}/expire")
    answer = await refreshed(ps, expiring["stripe_id"], ps.token(expiring["stripe_id"]))
    assert (answer["transaction"]["status"], answer["transaction"]["session_status"],
            answer["transaction"]["last_error"]) == ("canceled", "expired", None)

    monthly = await checkout(mode="subscription", price=await stripe.monthly_price(900))
    assert (await stripe.complete(monthly["stripe_id"], card=VISA))["subscription"].startswith("sub_")
    answer = await refreshed(ps, monthly["stripe_id"], ps.token(monthly["stripe_id"]))
    assert (answer["changed"], answer["transaction"]["status"], answer["transaction"]["payment_status"]) == (
        True, "succeeded", "paid")
