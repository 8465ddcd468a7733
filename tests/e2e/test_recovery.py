"""The sweeper (`paystream reconcile`): stuck transactions re-read from Stripe, old
authorisations expired; both pushed with their cause."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import asyncpg
import pytest

from paystream.dev.localstripe import LocalStripe
from tests.support import Paystream, StripeJs

pytestmark = pytest.mark.e2e


@pytest.fixture
async def stripe_js(local_stripe: LocalStripe) -> AsyncIterator[StripeJs]:
    async with StripeJs(local_stripe.url) as js:
        yield js


async def reconcile(ps: Paystream, local_stripe: LocalStripe, *ids: str) -> dict:
    env = {**os.environ, "DATABASE_URL": ps.server.database_url, "STRIPE_API_KEY": "sk_test_paystream",
           "STRIPE_API_BASE": local_stripe.url}
    args = [sys.executable, "-m", "paystream", "reconcile", "--older-than", "0"]
    for i in ids:
        args += ["--id", i]
    result = await asyncio.to_thread(subprocess.run, args, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def test_a_silent_authentication_failure_is_found_and_pushed(
        ps: Paystream, stripe_js: StripeJs, local_stripe: LocalStripe) -> None:
    created = (await ps.http.post("/v1/transactions", headers=ps.backend,
                                  json={"kind": "payment", "amount": 1800, "currency": "usd"})).json()
    txn_id = created["transaction"]["id"]
    pi = (await ps.get(txn_id)).json()["stripe_id"]
    await stripe_js.pay(pi, "4000000000003220")
    await ps.deliver(ps.event("payment_intent.requires_action", pi, amount=1800, metadata={"transaction_id": txn_id}))
    # The customer fails the challenge; localstripe sends no webhook for that.
    assert (await stripe_js.authenticate(pi, created["client_secret"], success=False)).status_code == 200
    async with ps.sse(txn_id, token=created["stream_token"]) as stream:
        assert (await stream.event()).json["status"] == "requires_action"
        report = await reconcile(ps, local_stripe, txn_id)
        assert (report["checked"], report["moved"]) == (1, 1)
        push = await stream.event()
    assert push.json["status"] == "requires_payment_method"
    assert push.json["last_error"]["code"] == "payment_intent_authentication_failure"
    assert push.json["cause"] == {"stripe_event_id": None, "type": "paystream.reconcile"}


async def test_an_authorisation_left_uncaptured_for_7_days_is_released(
        ps: Paystream, stripe_js: StripeJs, local_stripe: LocalStripe, db: asyncpg.Connection) -> None:
    created = (await ps.http.post("/v1/transactions", headers=ps.backend, json={
        "kind": "payment", "amount": 5000, "currency": "usd", "capture_method": "manual"})).json()
    txn_id = created["transaction"]["id"]
    pi = (await ps.get(txn_id)).json()["stripe_id"]
    assert (await stripe_js.pay(pi, "4242424242424242")).json()["status"] == "requires_capture"
    await ps.deliver(ps.event("payment_intent.amount_capturable_updated", pi, amount=5000,
                              metadata={"transaction_id": txn_id}))
    assert (await ps.get(txn_id)).json()["status"] == "requires_capture"
    await db.execute("UPDATE transactions SET updated_at = now() - interval '8 days' WHERE id = $1", txn_id)
    report = await reconcile(ps, local_stripe, txn_id)
    assert (report["expiring"], report["outbox_done"]) == (1, 1)
    txn = (await ps.get(txn_id)).json()
    assert txn["status"] == "canceled"
    cause = await db.fetchval("SELECT data::json->'cause'->>'type' FROM transaction_events"
                              " WHERE transaction_id = $1 ORDER BY seq DESC LIMIT 1", txn_id)
    assert cause == "paystream.authorization.expired"
    assert (await stripe_js.payment_intent(pi))["status"] == "canceled"
