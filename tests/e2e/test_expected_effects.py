"""Effects belong to the database, not to whichever process applies an event (issue 22,
item 1): `paystream migrate` records the effects and the outbound webhooks its
environment names; `backfill` and `events --reprocess` run from a bare environment still
run every one of them once for every logged event; a `serve` whose settings ask for
other effects refuses to start in one line naming the setting."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator

import asyncpg
import pytest

from paystream.dev.localstripe import LocalStripe
from tests.conftest import ARTIFACTS, Server
from tests.e2e.test_backfill import VISA, events_listed, run_backfill
from tests.harness import ROOT, free_port
from tests.support import Paystream, StripeJs, wait_until
from tests.support import cli as paystream

pytestmark = pytest.mark.e2e

OUTBOUND_SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
EFFECTS_ENV = {"PAYSTREAM_EFFECTS": "tests.effects_probe:effect",
               "PAYSTREAM_OUTBOUND_URL": "http://127.0.0.1:9/hooks",  # nobody there: rows stay queued
               "PAYSTREAM_OUTBOUND_SECRET": OUTBOUND_SECRET,
               "PYTHONPATH": str(ROOT)}


def bare_env(**values: str) -> dict[str, str]:
    """What an operator's shell has when running a one-off command: no PAYSTREAM_* at all."""
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    return {**keep, **values}


@pytest.fixture
def lost_webhooks() -> Iterator[LocalStripe]:
    stripe = LocalStripe(free_port(), ARTIFACTS).start()
    yield stripe
    stripe.stop()


async def each_logged_event_had_every_effect(db: asyncpg.Connection, txn_ids: list[str]) -> list[tuple]:
    """(transaction, seq, probe calls, outbound rows) for every logged event of these
    transactions: both counts must be exactly 1."""
    rows = await db.fetch(
        """SELECT e.transaction_id, e.seq,
                  (SELECT count(*) FROM probe_calls p WHERE p.transaction_id = e.transaction_id AND p.seq = e.seq),
                  (SELECT count(*) FROM outbound_deliveries o
                    WHERE o.transaction_id = e.transaction_id AND o.seq = e.seq)
             FROM transaction_events e WHERE e.transaction_id = ANY($1) ORDER BY 1, 2""", txn_ids)
    return [tuple(r) for r in rows]


async def test_backfill_and_reprocess_from_a_bare_environment_run_every_effect(
        own_database: str, lost_webhooks: LocalStripe) -> None:
    migrated = paystream("migrate", env=bare_env(DATABASE_URL=own_database, **EFFECTS_ENV))
    assert migrated.returncode == 0, migrated.stderr
    assert "probe" in migrated.stdout and "signed webhooks to the merchant's backend on" in migrated.stdout

    server = Server(own_database, {"STRIPE_API_BASE": lost_webhooks.url, **EFFECTS_ENV})
    lost_webhooks.register_webhook(f"http://127.0.0.1:{free_port()}/v1/stripe/webhook", server.webhook_secret)
    await asyncio.to_thread(server.start)
    db = await asyncpg.connect(own_database)
    try:
        async with Paystream(server) as ps, StripeJs(lost_webhooks.url) as stripe_js:
            customer = await stripe_js.customer()
            txns = []
            for amount in (2100, 2200, 2300):
                resp = await ps.http.post("/v1/transactions", headers=ps.backend, json={
                    "kind": "wallet_top_up", "amount": amount, "currency": "usd", "customer_id": customer})
                assert resp.status_code == 201, resp.text
                txns.append(resp.json()["transaction"])
                assert (await stripe_js.pay(txns[-1]["stripe_id"], VISA)).status_code == 200
            await wait_until(lambda: events_listed(lost_webhooks, [t["stripe_id"] for t in txns]), timeout=15,
                             what="localstripe's events")

            # The operator's one-off backfill: database and Stripe settings only.
            operator = Server(own_database, {"STRIPE_API_BASE": lost_webhooks.url})
            operator.env = bare_env(DATABASE_URL=own_database, STRIPE_API_KEY=server.env["STRIPE_API_KEY"],
                                    STRIPE_API_BASE=lost_webhooks.url)
            report = await asyncio.to_thread(run_backfill, operator, "--since", "1h")
            assert report["applied"].get("applied", 0) >= len(txns), report
            ids = [t["id"] for t in txns]
            assert {(await ps.get(t)).json()["status"] for t in ids} == {"succeeded"}
            effects = await each_logged_event_had_every_effect(db, ids)
            assert len(effects) >= 2 * len(txns), effects
            assert all(probe == 1 and queued == 1 for _, _, probe, queued in effects), effects
            credits = await db.fetchval(
                "SELECT count(*) FROM ledger_entries WHERE transaction_id = ANY($1) AND account = $2",
                ids, f"wallet:{customer}")
            assert credits == len(txns)  # the wallet, a built-in effect, once each

            # An event kept unprocessed (the merchant's effect failed), reprocessed by hand.
            await db.execute("UPDATE probe_switch SET broken = true")
            pi = "pi_" + secrets.token_hex(8)
            failed = await ps.send(ps.event("payment_intent.processing", pi, metadata={"probe": "explode"}))
            assert failed.status_code == 500, failed.text
            await db.execute("UPDATE probe_switch SET broken = false")
            redo = paystream("events", "failed", "--reprocess", env=bare_env(DATABASE_URL=own_database))
            assert redo.returncode == 0, redo.stderr
            assert '"outcome": "applied"' in redo.stdout, redo.stdout
            txn = (await ps.get(pi)).json()["id"]
            assert await each_logged_event_had_every_effect(db, [txn]) == [(txn, 1, 1, 1)]
    finally:
        await db.close()
        server.stop()


async def test_serve_refuses_other_effects_than_the_database_expects(own_database: str) -> None:
    migrated = paystream("migrate", env=bare_env(DATABASE_URL=own_database, **EFFECTS_ENV))
    assert migrated.returncode == 0, migrated.stderr
    for setting, named in ((dict(EFFECTS_ENV, PAYSTREAM_EFFECTS=""), "PAYSTREAM_EFFECTS"),
                           (dict(EFFECTS_ENV, PAYSTREAM_EFFECTS="tests.effects_probe:effect,"
                                 "examples.contract_revisions:effect"), "PAYSTREAM_EFFECTS")):
        server = Server(own_database, setting)
        out = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "paystream", "serve", "--port", str(server.port)],
            env=server.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and named in lines[0], out.stderr

    # Recorded without outbound webhooks: a node that would queue them is refused too.
    without = {k: v for k, v in EFFECTS_ENV.items() if not k.startswith("PAYSTREAM_OUTBOUND")}
    assert paystream("migrate", env=bare_env(DATABASE_URL=own_database, **without)).returncode == 0
    server = Server(own_database, EFFECTS_ENV)
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "paystream", "serve", "--port", str(server.port)],
        env=server.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "PAYSTREAM_OUTBOUND_URL" in lines[0], out.stderr
