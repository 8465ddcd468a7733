"""Capture and cancel through paystream (issue 24, section 2): one call to Stripe each,
idempotent, applied and pushed like a webhook; what cannot be done is a precise 4xx and
reaches Stripe not at all."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from paystream.dev.localstripe import LocalStripe
from tests.support import Paystream, StripeJs

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
