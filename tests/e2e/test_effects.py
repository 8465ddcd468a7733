"""Merchant effects through the public interface (tests/effects_probe): called exactly
once for every logged event, inside its database transaction, whatever duplicates,
order and concurrency; an exception aborts the change and the event is kept for
`paystream events --reprocess`; a name that cannot be loaded stops start-up."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from paystream import db as paystream_db
from paystream.dev import trigger
from tests.conftest import Server
from tests.harness import ROOT
from tests.support import Paystream

pytestmark = pytest.mark.e2e

PROBE_MIGRATIONS = {"probe": Path(__file__).resolve().parents[1] / "effects_probe" / "migrations"}
PROBE_ENV = {"PAYSTREAM_EFFECTS": "tests.effects_probe:effect,sql:public.probe_sql_on_status",
             "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def probe_server(database_url: str) -> Iterator[Server]:
    asyncio.run(paystream_db.migrate(database_url, PROBE_MIGRATIONS))
    server = Server(database_url, PROBE_ENV).start()
    yield server
    server.stop()


@pytest.fixture
async def probe(probe_server: Server) -> AsyncIterator[Paystream]:
    async with Paystream(probe_server) as client:
        yield client


async def test_each_effect_runs_once_for_every_logged_event(probe: Paystream, db: asyncpg.Connection) -> None:
    t = int(time.time()) - 600
    pis = [trigger.stripe_id("pi_") for _ in range(6)]
    events = []
    for pi in pis:
        events += [probe.event("payment_intent.processing", pi, created=t),
                   probe.event("payment_intent.succeeded", pi, created=t + 1),
                   probe.event("charge.refunded", pi, amount=1500, amount_refunded=500, created=t + 2),
                   probe.event("charge.refunded", pi, amount=1500, amount_refunded=900, created=t + 3)]
    deliveries = [e for e in events for _ in range(4)]
    seed = random.randrange(1 << 30)
    print(f"delivery order seed: {seed}")
    random.Random(seed).shuffle(deliveries)
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for event in deliveries:
        queue.put_nowait(event)

    async def sender() -> None:
        while not queue.empty():
            await probe.deliver(queue.get_nowait())

    await asyncio.gather(*(sender() for _ in range(8)))
    ids = [r["id"] for r in await db.fetch("SELECT id FROM transactions WHERE stripe_id = ANY($1)", pis)]
    logged = await db.fetch(
        """SELECT transaction_id, seq, previous_status, event_type, data::text AS data FROM transaction_events
            WHERE transaction_id = ANY($1) ORDER BY 1, 2""", ids)
    calls = await db.fetch(
        "SELECT transaction_id, seq, previous_status, cause_type FROM probe_calls WHERE transaction_id = ANY($1)"
        " ORDER BY 1, 2", ids)
    sql_calls = await db.fetch(
        "SELECT transaction_id, seq, previous_status FROM probe_sql_calls WHERE transaction_id = ANY($1)"
        " ORDER BY 1, 2", ids)
    # How many are logged depends on the order (a refund first makes the rest late news),
    # never on the duplicates; every payment logs at least one.
    assert {e["transaction_id"] for e in logged} == set(ids) and len(ids) == len(pis)
    assert [(c["transaction_id"], c["seq"], c["previous_status"], c["cause_type"]) for c in calls] == [
        (e["transaction_id"], e["seq"], e["previous_status"], e["event_type"]) for e in logged]
    assert [tuple(c) for c in sql_calls] == [(e["transaction_id"], e["seq"], e["previous_status"]) for e in logged]
    for entry in logged:
        data = json.loads(entry["data"])
        assert data["sql_probe"] == entry["seq"]  # the SQL function's jsonb is pushed too
        assert data["probe"]["calls"] >= 1
        assert data["status"] != "never overwrites the contract's fields"


async def test_an_effect_that_fails_aborts_the_change_and_reprocess_applies_it_once(
        probe: Paystream, probe_server: Server, db: asyncpg.Connection) -> None:
    pi = trigger.stripe_id("pi_")
    await db.execute("UPDATE probe_switch SET broken = false")
    await probe.deliver(probe.event("payment_intent.processing", pi, created=int(time.time()) - 5,
                                    metadata={"probe": "explode"}))  # the transaction's metadata
    before = (await probe.get(pi)).json()
    event = probe.event("payment_intent.succeeded", pi, metadata={"probe": "explode"})
    await db.execute("UPDATE probe_switch SET broken = true")
    for _ in range(2):  # Stripe retries: the same 500, nothing half-applied
        resp = await probe.send(event)
        assert resp.status_code == 500, resp.text
    stored = await db.fetchrow("SELECT outcome, processed_at, error FROM stripe_events WHERE id = $1", event["id"])
    assert stored["outcome"] == "failed" and stored["processed_at"] is None
    assert "on purpose" in stored["error"]
    now = (await probe.get(pi)).json()
    assert (now["status"], now["seq"]) == (before["status"], before["seq"])
    assert await db.fetchval("SELECT count(*) FROM probe_calls WHERE transaction_id = $1", now["id"]) == 1

    await db.execute("UPDATE probe_switch SET broken = false")  # the merchant's fix
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "paystream", "events", "--reprocess", "--id", event["id"]],
        env=probe_server.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == {"id": event["id"], "outcome": "applied"}
    assert (await probe.deliver(event))["outcome"] == "duplicate"  # Stripe's next retry
    assert (await probe.get(pi)).json()["status"] == "succeeded"
    assert await db.fetchval("SELECT count(*) FROM probe_calls WHERE transaction_id = $1", now["id"]) == 2


@pytest.mark.parametrize(("setting", "named"), [
    ("tests.no_such_module:effect", "tests.no_such_module:effect"),
    ("tests.effects_probe:missing", "tests.effects_probe:missing"),
    ("sql:public.no_such_function", "public.no_such_function"),
    ("sql:drop table x", "sql:drop table x"),
])
def test_an_effect_that_cannot_be_loaded_stops_start_up_naming_it(
        database_url: str, setting: str, named: str) -> None:
    server = Server(database_url, {**PROBE_ENV, "PAYSTREAM_EFFECTS": setting})
    out = subprocess.run([sys.executable, "-m", "paystream", "serve", "--port", str(server.port)],
                         env=server.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], out.stderr


def test_the_built_in_effects_are_registered_entry_points() -> None:
    out = subprocess.run([sys.executable, "-c", "from paystream import effects; "
                          "print(','.join(e.name for e in effects.load(None)))"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PAYSTREAM_EFFECTS": ""})
    assert out.stdout.strip() == "card_validation,ledger,outbound,wallet", out.stderr
