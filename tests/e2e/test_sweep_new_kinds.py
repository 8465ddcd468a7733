"""The sweeper re-reads what no webhook settled, whatever its kind: a subscription still
`incomplete` and a Checkout Session still open, their webhooks lost, reach what Stripe
holds (`cause.type = "paystream.reconcile"`) without a refresh or a backfill."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.conftest import Server
from tests.e2e.new_kinds import URLS, VISA, Stripe, no_backfill, own_emulator
from tests.support import Paystream, wait_until

pytestmark = pytest.mark.e2e


async def test_the_sweeper_reads_a_stuck_subscription_and_a_stuck_session(
        isolated: tuple[str, asyncpg.Connection]) -> None:
    database_url, db = isolated  # its own: the shared database's stuck rows belong to other emulators
    with own_emulator(lost=True) as emulator:
        server = Server(database_url, {"STRIPE_API_BASE": emulator.url, "PAYSTREAM_BACKFILL_INTERVAL": "86400",
                                       "PAYSTREAM_STUCK_AFTER": "1", "PAYSTREAM_RECOVERY_INTERVAL": "0.5"})
        async with no_backfill(db):
            await asyncio.to_thread(server.start)
            try:
                async with Paystream(server) as ps, Stripe(emulator.url) as stripe:
                    customer, price = await stripe.customer(), await stripe.monthly_price(1900)
                    sub = await ps.http.post("/v1/transactions", headers=ps.backend, json={
                        "kind": "subscription", "customer_id": customer, "price": price})
                    assert sub.status_code == 201, sub.text
                    sub_txn, secret = sub.json()["transaction"]["id"], sub.json()["client_secret"]
                    assert (await stripe.pay(secret.split("_secret_")[0], VISA))["status"] == "succeeded"

                    session = await ps.http.post("/v1/transactions", headers=ps.backend, json={
                        "kind": "checkout", "mode": "payment", "amount": 2500, "currency": "usd", **URLS})
                    assert session.status_code == 201, session.text
                    cs_txn = session.json()["transaction"]["id"]
                    await stripe.complete(session.json()["transaction"]["stripe_id"], card=VISA)

                    async def swept() -> bool:
                        rows = await db.fetch(
                            """SELECT t.id, t.status, e.event_type FROM transactions t
                                 JOIN transaction_events e ON e.transaction_id = t.id AND e.seq = t.seq
                                WHERE t.id = ANY($1)""", [sub_txn, cs_txn])
                        return {(r["id"], r["status"], r["event_type"]) for r in rows} == {
                            (sub_txn, "active", "paystream.reconcile"), (cs_txn, "succeeded", "paystream.reconcile")}
                    await wait_until(swept, timeout=30, what="the sweeper's reads of the subscription and session")
            finally:
                server.stop()
