"""Backfill from Stripe's event log (issue 12): payments made while no webhook could
reach paystream reach their final state from `paystream backfill` and from a server's
start-up backfill, through the webhook's own path, each effect once; a second backfill
applies nothing.  So do subscriptions and Checkout Sessions (issue 23), whose events the
tests' emulator lists at /v1/events as Stripe does."""

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
from tests.e2e.new_kinds import URLS, Stripe, no_backfill, own_emulator
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


# --- kinds subscription and checkout (issue 23) ------------------------------------------


async def found(ps: Paystream, any_id: str) -> dict | None:
    resp = await ps.get(any_id)
    return resp.json() if resp.status_code == 200 else None


async def each_effect_once(db: asyncpg.Connection, txn_ids: list[str]) -> None:
    """No Stripe event logged twice on a transaction (each logged event runs the effects
    once), and every ledger group of theirs one balanced pair."""
    repeated = await db.fetch(
        """SELECT transaction_id, stripe_event_id, count(*) FROM transaction_events
            WHERE transaction_id = ANY($1) AND stripe_event_id IS NOT NULL GROUP BY 1, 2 HAVING count(*) > 1""",
        txn_ids)
    assert not repeated, repeated
    groups = await db.fetch("""SELECT entry_group, count(*) AS legs, sum(amount) AS total FROM ledger_entries
                                WHERE transaction_id = ANY($1) GROUP BY 1""", txn_ids)
    assert all((g["legs"], g["total"]) == (2, 0) for g in groups), groups


async def test_backfill_brings_a_subscription_and_a_checkout_session_to_their_state_once(
        isolated: tuple[str, asyncpg.Connection]) -> None:
    """Created through paystream, then paid (the subscription's first invoice on the page,
    the session on Stripe's hosted page) while every webhook was lost: `paystream
    backfill` reads the emulator's /v1/events, which lists what its extensions posted.
    On a database of its own: the shared one's other servers would take its subscription
    reads from the outbox and make them against their own emulators."""
    database_url, db = isolated
    with own_emulator(lost=True) as emulator:
        server = Server(database_url, {"STRIPE_API_BASE": emulator.url, "PAYSTREAM_BACKFILL_INTERVAL": "86400"})
        try:
            async with no_backfill(db):  # not the server's start-up pass: the command's, below
                await asyncio.to_thread(server.start)
                async with Paystream(server) as ps, Stripe(emulator.url) as stripe:
                    customer, price = await stripe.customer(), await stripe.monthly_price(2500)
                    resp = await ps.http.post("/v1/transactions", headers=ps.backend, json={
                        "kind": "subscription", "customer_id": customer, "price": price})
                    assert resp.status_code == 201, resp.text
                    sub_txn, secret = resp.json()["transaction"], resp.json()["client_secret"]
                    assert sub_txn["status"] == "incomplete" and secret
                    paid = await stripe.pay(secret.split("_secret_")[0], VISA)
                    assert paid["status"] == "succeeded", paid
                    sessions = {}
                    for name in ("paid", "expired"):
                        resp = await ps.http.post("/v1/transactions", headers=ps.backend, json={
                            "kind": "checkout", "mode": "payment", "amount": 3100, "currency": "usd", **URLS})
                        assert resp.status_code == 201, resp.text
                        sessions[name] = resp.json()["transaction"]
                    await stripe.complete(sessions["paid"]["stripe_id"], card=VISA)
                    await stripe.post(f"/v1/checkout/sessions/{sessions['expired']['stripe_id']}/expire")
                    sub, cs_paid, cs_expired = (sub_txn["stripe_id"], sessions["paid"]["stripe_id"],
                                                sessions["expired"]["stripe_id"])
                    await wait_until(lambda: stripe.listed(
                        ("customer.subscription.created", sub, "incomplete"),
                        ("customer.subscription.updated", sub, "active"),
                        ("checkout.session.completed", cs_paid, "complete"),
                        ("checkout.session.expired", cs_expired, "expired")), timeout=15, what="the emulator's events")
                    # Nothing arrived: paystream still has what it stored at creation.
                    assert (await ps.get(sub)).json()["status"] == "incomplete"
                    assert {(await ps.get(s)).json()["status"] for s in (cs_paid, cs_expired)} == {
                        "requires_payment_method"}
                    invoice = (await stripe.http.get("/v1/invoices", params={"subscription": sub})).json()["data"][0]
                    pi = (await stripe.http.get(f"/v1/checkout/sessions/{cs_paid}")).json()["payment_intent"]
                    assert await found(ps, invoice["id"]) is None and await found(ps, pi) is None
            async with Paystream(server) as ps:
                report = await asyncio.to_thread(run_backfill, server, "--since", "1h")
                assert report["ran"] and report["applied"].get("applied", 0) >= 3, report

                async def subscription_active() -> dict | None:
                    body = await found(ps, sub)
                    return body if body and body["status"] == "active" else None

                # Its activation is the .updated event, or the read its invoice's payment asks for.
                active = await wait_until(subscription_active, timeout=20, what="the subscription active")
                assert (active["kind"], active["amount"], active["last_error"]) == ("subscription", 2500, None)
                billed = await found(ps, invoice["id"])
                assert (billed["kind"], billed["status"], billed["subscription_id"]) == ("invoice", "succeeded", sub)
                session = (await ps.get(cs_paid)).json()
                assert (session["status"], session["session_status"], session["payment_status"]) == (
                    "succeeded", "complete", "paid")
                expired = (await ps.get(cs_expired)).json()
                assert (expired["status"], expired["session_status"]) == ("canceled", "expired")
                payment = await found(ps, pi)
                assert (payment["kind"], payment["status"]) == ("payment", "succeeded")
                by_backfill = await db.fetch(
                    """SELECT e.transaction_id, s.type FROM transaction_events e
                         JOIN stripe_events s ON s.id = e.stripe_event_id
                        WHERE e.transaction_id = ANY($1) AND s.headers->>'user-agent' = 'paystream backfill'""",
                    [sessions["paid"]["id"], sessions["expired"]["id"]])
                assert sorted(r["type"] for r in by_backfill) == ["checkout.session.completed",
                                                                   "checkout.session.expired"]
                txn_ids = [sub_txn["id"], billed["id"], session["id"], expired["id"], payment["id"]]
                await each_effect_once(db, txn_ids)
                captured = await db.fetchval("SELECT count(*) FROM ledger_entries WHERE transaction_id = $1"
                                             " AND entry_group = 'capture:' || transaction_id", billed["id"])
                assert captured == 2  # the invoice's money, once

                async def reads_done() -> bool:
                    return not await db.fetchval("SELECT count(*) FROM outbox WHERE transaction_id = ANY($1)"
                                                 " AND done_at IS NULL", txn_ids)

                await wait_until(reads_done, timeout=20, what="the subscription's reads")
                seqs = {t: (await ps.get(t)).json()["seq"] for t in txn_ids}
                again = await asyncio.to_thread(run_backfill, server, "--since", "1h")
                assert again["ran"] and again["applied"] == {}, again
                assert {t: (await ps.get(t)).json()["seq"] for t in txn_ids} == seqs
                await each_effect_once(db, txn_ids)
        finally:
            server.stop()


async def test_a_server_backfills_subscriptions_and_sessions_made_elsewhere_at_start_up(
        database_url: str, db: asyncpg.Connection) -> None:
    """While paystream was down, the merchant's own code subscribed a customer with a saved
    card (active at once) and a Payment Link's session was paid: a server starting adopts
    both from Stripe's event log, each effect once."""
    with own_emulator(lost=True) as emulator:
        async with Stripe(emulator.url) as stripe:
            customer, price = await stripe.customer(), await stripe.monthly_price(1900)
            await stripe.default_card(customer, VISA)
            sub = await stripe.post("/v1/subscriptions", customer=customer, **{"items[0][price]": price})
            assert sub["status"] == "active", sub
            cs = await stripe.post("/v1/checkout/sessions", mode="payment", **URLS, **{"metadata[link]": "plink_x",
                "line_items[0][quantity]": "2", "line_items[0][price_data][currency]": "eur",
                "line_items[0][price_data][unit_amount]": "1250",
                "line_items[0][price_data][product_data][name]": "Poster"})
            await stripe.complete(cs["id"], card=VISA)
            await wait_until(lambda: stripe.listed(("customer.subscription.created", sub["id"], "active"),
                                                   ("checkout.session.completed", cs["id"], "complete")),
                             timeout=15, what="the emulator's events")
            invoice = (await stripe.http.get("/v1/invoices", params={"subscription": sub["id"]})).json()["data"][0]
        server = Server(database_url, {"STRIPE_API_BASE": emulator.url, "PAYSTREAM_BACKFILL_INTERVAL": "86400"})
        await asyncio.to_thread(server.start)
        try:
            async with Paystream(server) as ps:
                async def adopted() -> tuple[dict, ...] | None:
                    bodies = [await found(ps, i) for i in (sub["id"], cs["id"], invoice["id"])]
                    if any(b is None for b in bodies):
                        return None
                    return tuple(bodies) if [b["status"] for b in bodies] == ["active", "succeeded",
                                                                              "succeeded"] else None

                sub_txn, session, billed = await wait_until(adopted, timeout=30, what="the start-up backfill")
                assert (sub_txn["kind"], sub_txn["amount"], sub_txn["currency"]) == ("subscription", 1900, "usd")
                assert (session["kind"], session["amount"], session["currency"], session["metadata"]) == (
                    "checkout", 2500, "eur", {"link": "plink_x"})
                assert (billed["kind"], billed["subscription_id"]) == ("invoice", sub["id"])
                payment = await found(ps, (await emulator_session(emulator.url, cs["id"]))["payment_intent"])
                assert payment is not None and payment["status"] == "succeeded"
                await each_effect_once(db, [sub_txn["id"], session["id"], billed["id"], payment["id"]])
            assert "backfilled customer.subscription.created" in server.log_path.read_text()
        finally:
            server.stop()


async def emulator_session(base_url: str, session: str) -> dict:
    async with Stripe(base_url) as stripe:
        return (await stripe.http.get(f"/v1/checkout/sessions/{session}")).json()
