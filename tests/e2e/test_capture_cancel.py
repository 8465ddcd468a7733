"""Capture and cancel through paystream (issue 24, section 2): one call to Stripe each,
idempotent, applied and pushed like a webhook; what cannot be done is a precise 4xx and
reaches Stripe not at all."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncio
import time

import asyncpg
import pytest
import stripe

from paystream.dev import trigger
from paystream.dev.localstripe import LocalStripe
from tests.conftest import Server
from tests.support import Paystream, StripeJs, cli

pytestmark = pytest.mark.e2e

VISA = "4242424242424242"


@pytest.fixture
async def stripe_js(local_stripe: LocalStripe) -> AsyncIterator[StripeJs]:
    async with StripeJs(local_stripe.url) as js:
        yield js


async def authorised(ps: Paystream, stripe_js: StripeJs, amount: int = 1500) -> tuple[dict, str]:
    resp = await ps.http.post("/v1/transactions", headers=ps.backend, json={
        "kind": "payment", "amount": amount, "currency": "usd", "capture_method": "manual"})
    assert resp.status_code == 201, resp.text
    created = resp.json()
    pi = created["transaction"]["stripe_id"]
    assert (await stripe_js.pay(pi, VISA)).status_code == 200
    assert (await stripe_js.payment_intent(pi))["status"] == "requires_capture"
    return created, pi


async def post(ps: Paystream, txn: str, op: str, body: dict | None = None):  # noqa: ANN201
    return await ps.http.post(f"/v1/transactions/{txn}/{op}", headers=ps.backend, json=body or {})


@pytest.mark.parametrize("amount", [None, 1000])
async def test_capture_is_pushed_and_idempotent(ps: Paystream, stripe_js: StripeJs, amount: int | None) -> None:
    created, pi = await authorised(ps, stripe_js)
    txn = created["transaction"]["id"]
    async with ps.sse(txn, token=created["stream_token"]) as stream:
        assert (await stream.event()).event == "snapshot"
        resp = await post(ps, txn, "capture", {"amount": amount} if amount else {})
        assert resp.status_code == 200, resp.text
        assert resp.json()["transaction"]["status"] == "succeeded"
        assert resp.json()["transaction"]["amount"] == (amount or 1500)  # what was taken
        frame = await stream.event()
        while frame is not None and frame.json["status"] != "succeeded":
            frame = await stream.event()
        assert frame is not None and frame.json["cause"]["type"] in ("paystream.capture", "payment_intent.succeeded")
    assert await captured(stripe_js, pi) == (amount or 1500)
    again = await post(ps, txn, "capture", {"amount": amount} if amount else {})
    assert again.status_code == 200 and again.json()["transaction"]["status"] == "succeeded"
    assert await captured(stripe_js, pi) == (amount or 1500)  # captured once


async def captured(stripe_js: StripeJs, pi: str) -> int:
    """What Stripe took (tests/stripe_emulator/capture.py: as Stripe records a partial capture)."""
    stripe_pi = await stripe_js.payment_intent(pi)
    assert stripe_pi["status"] == "succeeded"
    charge_id = stripe_pi["latest_charge"] if isinstance(stripe_pi["latest_charge"], str) else stripe_pi["latest_charge"]["id"]
    charge = (await stripe_js.http.get(f"/v1/charges/{charge_id}")).json()
    assert charge["captured"] is True
    assert charge["amount_refunded"] == 0
    return charge.get("amount_captured", charge["amount"])


async def test_cancel_releases_an_authorisation_and_then_capture_is_refused(
        ps: Paystream, stripe_js: StripeJs) -> None:
    created, pi = await authorised(ps, stripe_js)
    txn = created["transaction"]["id"]
    resp = await post(ps, txn, "cancel", {"reason": "requested_by_customer"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["transaction"]["status"] == "canceled"
    assert (await ps.get(txn)).json()["status"] == "canceled"
    assert (await stripe_js.payment_intent(pi))["status"] == "canceled"
    assert (await post(ps, txn, "cancel")).json()["transaction"]["status"] == "canceled"  # idempotent
    refused = await post(ps, txn, "capture")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "not_capturable"


async def test_what_cannot_be_done_is_a_precise_4xx(ps: Paystream, stripe_js: StripeJs) -> None:
    created, pi = await authorised(ps, stripe_js, amount=1500)
    txn = created["transaction"]["id"]
    over = await post(ps, txn, "capture", {"amount": 1501})
    assert over.status_code == 400 and over.json()["error"]["code"] == "capture_exceeds_authorized"
    assert (await stripe_js.payment_intent(pi))["status"] == "requires_capture"  # nothing reached Stripe
    bad = await post(ps, txn, "capture", {"amount": -1})
    assert bad.status_code == 400
    unknown = await post(ps, txn, "cancel", {"reason": "because"})
    assert unknown.status_code == 400
    assert (await post(ps, txn, "capture")).status_code == 200
    late = await post(ps, txn, "cancel")
    assert late.status_code == 409 and late.json()["error"]["code"] == "not_cancelable"
    missing = await post(ps, "txn_01HZZZZZZZZZZZZZZZZZZZZZZZ", "capture")
    assert missing.status_code == 404
    no_key = await ps.http.post(f"/v1/transactions/{txn}/capture", json={})
    assert no_key.status_code == 401


async def test_a_capture_before_the_authorisation_is_refused_and_does_not_block_the_real_one(
        ps: Paystream, stripe_js: StripeJs) -> None:
    resp = await ps.http.post("/v1/transactions", headers=ps.backend, json={
        "kind": "payment", "amount": 1500, "currency": "usd", "capture_method": "manual"})
    txn, pi = resp.json()["transaction"]["id"], resp.json()["transaction"]["stripe_id"]
    early = await post(ps, txn, "capture")
    assert early.status_code == 409 and early.json()["error"]["code"] == "not_capturable"
    assert (await stripe_js.pay(pi, VISA)).status_code == 200
    late = await post(ps, txn, "capture")
    assert late.status_code == 200, late.text
    assert late.json()["transaction"]["status"] == "succeeded"


async def test_a_partial_capture_of_a_top_up_credits_only_what_was_taken(
        ps: Paystream, stripe_js: StripeJs, db: asyncpg.Connection) -> None:
    customer = await stripe_js.customer()
    resp = await ps.http.post("/v1/transactions", headers=ps.backend, json={
        "kind": "wallet_top_up", "amount": 10000, "currency": "usd", "customer_id": customer,
        "capture_method": "manual"})
    assert resp.status_code == 201, resp.text
    txn, pi = resp.json()["transaction"]["id"], resp.json()["transaction"]["stripe_id"]
    assert (await stripe_js.pay(pi, VISA)).status_code == 200
    captured_ = await post(ps, txn, "capture", {"amount": 100})
    assert captured_.status_code == 200, captured_.text
    assert captured_.json()["transaction"]["amount"] == 100
    balance = await db.fetchval("SELECT coalesce(sum(amount), 0) FROM ledger_entries WHERE account = $1",
                                f"wallet:{customer}")
    assert balance == 100
    over = await ps.http.post(f"/v1/transactions/{txn}/refunds", headers=ps.backend, json={"amount": 101})
    assert over.status_code == 400 and over.json()["error"]["code"] == "refund_exceeds_captured"


@pytest.mark.parametrize("kind", ["payment", "wallet_top_up"])
async def test_a_partial_capture_made_in_the_dashboard_takes_only_what_was_captured(
        ps: Paystream, server: Server, stripe_js: StripeJs, local_stripe: LocalStripe, db: asyncpg.Connection,
        kind: str) -> None:
    """The merchant captures 600 of 1,500 beside paystream (the Dashboard, its own code):
    only Stripe's event says so, and the transaction, ledger and refunds follow it."""
    customer = await stripe_js.customer()
    resp = await ps.http.post("/v1/transactions", headers=ps.backend, json={
        "kind": kind, "amount": 1500, "currency": "usd", "customer_id": customer, "capture_method": "manual"})
    assert resp.status_code == 201, resp.text
    created = resp.json()
    txn, pi = created["transaction"]["id"], created["transaction"]["stripe_id"]
    assert (await stripe_js.pay(pi, VISA)).status_code == 200
    dashboard = stripe.StripeClient("sk_test_dashboard", base_addresses={"api": local_stripe.url},
                                    http_client=stripe.HTTPXClient(timeout=15))
    async with ps.sse(txn, token=created["stream_token"]) as stream:
        assert (await stream.event()).event == "snapshot"
        taken = await dashboard.v1.payment_intents.capture_async(pi, {"amount_to_capture": 600})
        assert taken.status == "succeeded"
        frame = await stream.event()  # the webhook's move, pushed
        while frame is not None and frame.json["status"] != "succeeded":
            frame = await stream.event()
        assert frame is not None and frame.json["amount"] == 600, frame
    assert await captured(stripe_js, pi) == 600
    assert (await ps.get(txn)).json()["amount"] == 600
    account = f"wallet:{customer}" if kind == "wallet_top_up" else "merchant:revenue"
    assert await db.fetchval("SELECT sum(amount) FROM ledger_entries WHERE transaction_id = $1 AND account = $2",
                             txn, account) == 600
    check = await asyncio.to_thread(cli, "ledger", "--check", "--transaction", txn, env=server.env)
    assert (check.returncode, check.stdout.strip()) == (0, '{"problems": 0}'), check.stdout + check.stderr
    over = await ps.http.post(f"/v1/transactions/{txn}/refunds", headers=ps.backend, json={"amount": 601})
    assert over.status_code == 400 and over.json()["error"]["code"] == "refund_exceeds_captured"
    # paystream's own capture afterwards: captured already, the same answer.
    again = await post(ps, txn, "capture")
    assert again.status_code == 200 and again.json()["transaction"]["amount"] == 600
    assert await captured(stripe_js, pi) == 600


@pytest.mark.parametrize("refund_first", [False, True], ids=["capture_then_refund", "refund_then_capture"])
async def test_a_partial_capture_reported_only_by_events_holds_in_any_order(
        ps: Paystream, server: Server, db: asyncpg.Connection, refund_first: bool) -> None:
    """Stripe's events of a Dashboard capture of 600 of 1,500, then a refund of 200: the
    refund's charge.refunded may come before payment_intent.succeeded, and either first
    takes only what was captured."""
    pi = trigger.stripe_id("pi_")
    base = int(time.time()) - 60
    await ps.deliver(ps.event("payment_intent.amount_capturable_updated", pi, amount=1500, created=base))
    succeeded = ps.event("payment_intent.succeeded", pi, amount=1500, created=base + 1)
    succeeded["data"]["object"]["amount_received"] = 600
    refunded = ps.event("charge.refunded", pi, amount=1500, amount_refunded=200, created=base + 2)
    refunded["data"]["object"].update(amount_captured=600, refunded=False)
    for event in ([refunded, succeeded] if refund_first else [succeeded, refunded]):
        await ps.deliver(event)
    txn = (await ps.get(pi)).json()
    assert (txn["status"], txn["amount"], txn["amount_refunded"]) == ("partially_refunded", 600, 200)
    assert await db.fetchval("SELECT sum(amount) FROM ledger_entries WHERE transaction_id = $1 AND account = $2",
                             txn["id"], "merchant:revenue") == 400
    check = await asyncio.to_thread(cli, "ledger", "--check", "--transaction", txn["id"], env=server.env)
    assert (check.returncode, check.stdout.strip()) == (0, '{"problems": 0}'), check.stdout + check.stderr
