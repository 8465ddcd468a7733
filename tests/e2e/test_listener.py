"""A dropped LISTEN connection is noticed, re-established and caught up."""

from __future__ import annotations

import time

import asyncpg
import pytest

from paystream.dev import trigger
from tests.support import Paystream, wait_until

pytestmark = pytest.mark.e2e


async def listener_pids(db: asyncpg.Connection) -> list[int]:
    return [r["pid"] for r in await db.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'paystream-listener'"
        " AND datname = current_database()")]


async def test_killing_the_listener_loses_nothing(ps: Paystream, db: asyncpg.Connection) -> None:
    pi = trigger.stripe_id("pi_")
    now = int(time.time())
    await ps.deliver(ps.event("payment_intent.created", pi, created=now))
    async with ps.sse(pi) as stream:
        assert (await stream.event()).json["seq"] == 1
        [old] = await listener_pids(db)
        assert await db.fetchval("SELECT pg_terminate_backend($1)", old)
        # Sent at once, while the listener is likely still down: caught up from the log.
        await ps.deliver(ps.event("payment_intent.requires_action", pi, created=now + 1))
        assert (await stream.event()).json["status"] == "requires_action"
        new = await wait_until(lambda: listener_pids(db), what="a new listener connection")
        assert new != [old]
        # And after the reconnect, live notifications flow again.
        await ps.deliver(ps.event("payment_intent.succeeded", pi, created=now + 2))
        frames = await stream.rest()
    assert [(f.id, f.json["status"]) for f in frames] == [("3", "succeeded")]

    async def ready() -> bool:
        return (await ps.http.get("/readyz")).status_code == 200

    await wait_until(ready, what="/readyz")
    metrics = (await ps.http.get("/metrics")).text
    [line] = [m for m in metrics.splitlines() if m.startswith("paystream_listener_reconnects_total ")]
    assert float(line.split()[1]) >= 1


async def test_readyz_reports_database_and_listener(ps: Paystream) -> None:
    body = (await ps.http.get("/readyz")).json()
    assert body == {"status": "ok", "checks": {"database": True, "listener": True, "schema": True}}
    assert (await ps.http.get("/healthz")).json() == {"status": "ok"}
