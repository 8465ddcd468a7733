"""How long an authorisation is held is the transaction's own (issue 24 section 2):
`authorization_days` on POST /v1/transactions (manual capture only, 1 to 31, default 7),
shown as `authorization_expires_at`, and what the recovery sweeper releases by.  Rows are
aged by SQL in a database of the test's own rather than waited for."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime, timedelta

import asyncpg
import pytest

from paystream import db as paystream_db
from paystream.dev.localstripe import LocalStripe
from tests import harness, stripe_emulator
from tests.conftest import ARTIFACTS, Server
from tests.support import Paystream, StripeJs, wait_until

pytestmark = pytest.mark.e2e

VISA = "4242424242424242"


def parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


async def test_authorization_days_is_checked_before_anything_is_made(ps: Paystream) -> None:
    cases = [
        ({"capture_method": "manual", "authorization_days": 0}, "from 1 to 31"),
        ({"capture_method": "manual", "authorization_days": 32}, "from 1 to 31"),
        ({"capture_method": "manual", "authorization_days": -5}, "from 1 to 31"),
        ({"capture_method": "manual", "authorization_days": "7"}, "authorization_days"),
        ({"capture_method": "manual", "authorization_days": True}, "authorization_days"),
        ({"capture_method": "manual", "authorization_days": 2.5}, "authorization_days"),
        ({"capture_method": "automatic", "authorization_days": 7}, "capture_method \"manual\""),
        ({"authorization_days": 7}, "capture_method \"manual\""),
    ]
    for extra, words in cases:
        resp = await ps.http.post("/v1/transactions", headers=ps.backend,
                                  json={"kind": "payment", "amount": 1500, "currency": "usd", **extra})
        assert resp.status_code == 400, (extra, resp.text)
        error = resp.json()["error"]
        assert error["code"] == "bad_request" and words in error["message"], (extra, error)
    card = await ps.http.post("/v1/transactions", headers=ps.backend,
                              json={"kind": "card_validation", "authorization_days": 3})
    assert card.status_code == 400 and "capture_method" in card.json()["error"]["message"], card.text


@pytest.fixture
def own_stripe() -> Iterator[LocalStripe]:
    """The test emulator, of this test's own: its webhooks go to this test's server only."""
    stripe = LocalStripe(harness.free_port(), ARTIFACTS, module=stripe_emulator.MODULE, cwd=harness.ROOT).start()
    yield stripe
    stripe.stop()


async def test_an_authorisation_expires_after_its_own_days(own_database: str, own_stripe: LocalStripe) -> None:
    await paystream_db.migrate(own_database)
    server = Server(own_database, {"STRIPE_API_BASE": own_stripe.url, "PAYSTREAM_RECOVERY_INTERVAL": "0.2",
                                   "PAYSTREAM_RECONCILE_INTERVAL": "0"})
    own_stripe.register_webhook(f"{server.base_url}/v1/stripe/webhook", server.webhook_secret)
    await asyncio.to_thread(server.start)
    db = await asyncpg.connect(own_database)
    try:
        async with Paystream(server) as ps, StripeJs(own_stripe.url) as stripe_js:
            created = {}
            for name, days in (("short", 2), ("lodging", 31), ("default", None)):
                body = {"kind": "payment", "amount": 2000, "currency": "usd", "capture_method": "manual"}
                if days is not None:
                    body["authorization_days"] = days
                resp = await ps.http.post("/v1/transactions", headers=ps.backend, json=body)
                assert resp.status_code == 201, resp.text
                txn = resp.json()["transaction"]
                assert txn["authorization_expires_at"] is None  # nothing is held yet
                assert (await stripe_js.pay(txn["stripe_id"], VISA)).status_code == 200
                created[name] = txn
            assert await db.fetchval("SELECT authorization_days FROM transactions WHERE id = $1",
                                     created["default"]["id"]) == 7

            # localstripe sends no payment_intent.amount_capturable_updated: read Stripe now.
            for txn in created.values():
                refreshed = await ps.http.post(f"/v1/transactions/{txn['id']}/refresh", headers=ps.backend)
                assert refreshed.status_code == 200, refreshed.text
                assert refreshed.json()["transaction"]["status"] == "requires_capture"
            for name, days in (("short", 2), ("lodging", 31), ("default", 7)):
                shown = (await ps.get(created[name]["id"])).json()
                assert parse(shown["authorization_expires_at"]) - parse(shown["updated_at"]) == timedelta(days=days)

            # Held for 8 days, in one statement, so one sweep judges all three alike:
            # past 2 and past the default 7, within 31.
            await db.execute("UPDATE transactions SET updated_at = updated_at - interval '8 days' WHERE id = ANY($1)",
                             [t["id"] for t in created.values()])

            async def released() -> bool:
                statuses = {n: (await ps.get(t["id"])).json()["status"] for n, t in created.items()}
                done = await db.fetchval(
                    "SELECT count(*) FROM outbox WHERE transaction_id = ANY($1) AND done_at IS NOT NULL",
                    [created["short"]["id"], created["default"]["id"]])
                return statuses["short"] == statuses["default"] == "canceled" and done == 2

            await wait_until(released, timeout=20, what="the expired authorisations to be released")
            for name in ("short", "default"):
                pi = await stripe_js.payment_intent(created[name]["stripe_id"])
                assert pi["status"] == "canceled", pi
                # The sweeper released it (Stripe's own payment_intent.canceled may log it first).
                jobs = await db.fetch("SELECT kind, done_at IS NOT NULL AS done FROM outbox WHERE transaction_id = $1",
                                      created[name]["id"])
                assert [(j["kind"], j["done"]) for j in jobs] == [("expire_authorization", True)]
                assert (await ps.get(created[name]["id"])).json()["authorization_expires_at"] is None
            lodging = (await ps.get(created["lodging"]["id"])).json()
            assert lodging["status"] == "requires_capture"
            assert (await stripe_js.payment_intent(created["lodging"]["stripe_id"]))["status"] == "requires_capture"
            assert await db.fetchval("SELECT count(*) FROM outbox WHERE transaction_id = $1",
                                     created["lodging"]["id"]) == 0
            expires = parse(lodging["authorization_expires_at"])
            assert expires - parse(lodging["updated_at"]) == timedelta(days=31)
            capture = await ps.http.post(f"/v1/transactions/{created['lodging']['id']}/capture",
                                         headers=ps.backend, json={})
            assert capture.status_code == 200 and capture.json()["transaction"]["status"] == "succeeded", capture.text
            assert capture.json()["transaction"]["authorization_expires_at"] is None
    finally:
        await db.close()
        server.stop()
