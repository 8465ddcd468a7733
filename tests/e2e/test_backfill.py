"""Backfill from Stripe's event log (issue 12): payments made while no webhook could
reach paystream reach their final state from `paystream backfill` and from a server's
start-up backfill, through the webhook's own path, each effect once; a second backfill
applies nothing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator

import asyncpg
import httpx
import pytest

from paystream.dev.localstripe import LocalStripe
from tests.conftest import ARTIFACTS, Server
from tests.harness import free_port
from tests.support import Paystream, StripeJs, wait_until

pytestmark = pytest.mark.e2e

VISA = "4242424242424242"


@pytest.fixture
def lost_webhooks() -> Iterator[LocalStripe]:
    """A local Stripe of this test's own whose webhooks go to a closed port: lost."""
    stripe = LocalStripe(free_port(), ARTIFACTS).start()
    yield stripe
    stripe.stop()


async def events_listed(stripe: LocalStripe, pis: list[str]) -> bool:
    async with httpx.AsyncClient(base_url=stripe.url, headers={"Authorization": "Bearer sk_test_x"}) as http:
        data = (await http.get("/v1/events", params={"limit": 100})).json()["data"]
    succeeded = {e["data"]["object"]["id"] for e in data if e["type"] == "payment_intent.succeeded"}
    return set(pis) <= succeeded


def run_backfill(server: Server, *args: str) -> dict:
    """`paystream backfill`, again while another process holds the backfill lock (other
    servers on this database run theirs at start-up)."""
    for _ in range(50):
        out = subprocess.run([sys.executable, "-m", "paystream", "backfill", *args], env=server.env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout.strip().splitlines()[-1])
        if report["ran"]:
            return report
        time.sleep(0.1)  # another process's backfill: an outside fact, polled
    raise AssertionError("the backfill lock was never free")


async def test_backfill_applies_what_never_arrived_once(
        database_url: str, db: asyncpg.Connection, lost_webhooks: LocalStripe) -> None:
    server = Server(database_url, {"STRIPE_API_BASE": lost_webhooks.url})
    lost_webhooks.register_webhook(f"http://127.0.0.1:{free_port()}/v1/stripe/webhook", server.webhook_secret)
    await asyncio.to_thread(server.start)
    try:
        async with Paystream(server) as ps, StripeJs(lost_webhooks.url) as stripe_js:
            customer = await stripe_js.customer()
            txns = []
            for amount in (1100, 1200, 1300):
                resp = await ps.http.post("/v1/transactions", headers=ps.backend, json={
                    "kind": "wallet_top_up", "amount": amount, "currency": "usd", "customer_id": customer})
                assert resp.status_code == 201, resp.text
                txns.append(resp.json()["transaction"])
                assert (await stripe_js.pay(txns[-1]["stripe_id"], VISA)).status_code == 200
            pis = [t["stripe_id"] for t in txns]
            await wait_until(lambda: events_listed(lost_webhooks, pis), timeout=15, what="localstripe's events")
            assert {(await ps.get(t["id"])).json()["status"] for t in txns} == {"requires_payment_method"}

            report = await asyncio.to_thread(run_backfill, server, "--since", "1h")
            assert report["ran"] and report["applied"].get("applied", 0) >= len(txns), report
            assert {(await ps.get(t["id"])).json()["status"] for t in txns} == {"succeeded"}
            causes = await db.fetch(
                """SELECT e.event_type, s.headers FROM transaction_events e
                     JOIN stripe_events s ON s.id = e.stripe_event_id
                    WHERE e.transaction_id = ANY($1) AND e.status = 'succeeded'""", [t["id"] for t in txns])
            assert len(causes) == len(txns)
            assert all(c["headers"]["user-agent"] == "paystream backfill" for c in causes)
            credits = await db.fetch(
                """SELECT transaction_id, count(*) FROM ledger_entries WHERE transaction_id = ANY($1)
                    AND account = $2 GROUP BY 1""", [t["id"] for t in txns], f"wallet:{customer}")
            assert sorted(c["count"] for c in credits) == [1, 1, 1]  # each top-up credited once

            again = await asyncio.to_thread(run_backfill, server, "--since", "1h")
            assert again["ran"] and again["applied"] == {}, again
    finally:
        server.stop()


async def test_a_server_backfills_at_start_up(
        database_url: str, db: asyncpg.Connection, lost_webhooks: LocalStripe) -> None:
    """Payments made while paystream was down (created at Stripe by the merchant's own
    code, naming no transaction of ours) appear as transactions once it starts."""
    env = {"STRIPE_API_BASE": lost_webhooks.url}
    server = Server(database_url, env)
    lost_webhooks.register_webhook(f"http://127.0.0.1:{free_port()}/v1/stripe/webhook", server.webhook_secret)
    pis = []
    async with StripeJs(lost_webhooks.url) as stripe_js:
        for amount in (700, 800):
            created = await stripe_js.http.post("/v1/payment_intents", data={
                "amount": amount, "currency": "usd", "payment_method_types[]": "card"})
            assert created.status_code == 200, created.text
            pis.append(created.json()["id"])
            assert (await stripe_js.pay(pis[-1], VISA)).status_code == 200
    await wait_until(lambda: events_listed(lost_webhooks, pis), timeout=15, what="localstripe's events")
    await asyncio.to_thread(server.start)
    try:
        async def all_succeeded() -> bool:
            rows = await db.fetch("SELECT status FROM transactions WHERE stripe_id = ANY($1)", pis)
            return len(rows) == len(pis) and all(r["status"] == "succeeded" for r in rows)

        await wait_until(all_succeeded, timeout=20, what="the start-up backfill")
        assert "backfill" in server.log_path.read_text()
    finally:
        server.stop()
