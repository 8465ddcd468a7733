"""NATS JetStream as the fan-out engine (PAYSTREAM_BROKER): nodes hear each other's changes
through NATS with no LISTEN connection, and their commits NOTIFY nothing (signed webhooks
to a backend included); an event committed by a process that dies before
publishing it is published by another; a NATS restart in the middle of a burst loses and
doubles nothing.  Each test uses a stream of its own (PAYSTREAM_BROKER_NAME) on the
machine's NATS, or a nats-server of its own where it restarts it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import nats
import pytest

from paystream.changes.store import CHANNEL
from paystream.dev import trigger
from paystream.dev.localstripe import LocalStripe
from paystream.effects.outbound import OUTBOUND_CHANNEL
from tests.conftest import Server
from tests.e2e.test_outbound import Backend, outbound_env
from tests.harness import free_port
from tests.support import SSE, Paystream, wait_until

pytestmark = pytest.mark.e2e
NATS_URL = os.environ.get("PAYSTREAM_TEST_NATS", "nats://127.0.0.1:4222")
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
STEPS = ["payment_intent.created", "payment_intent.processing", "payment_intent.succeeded"]


@pytest.fixture
async def stream_name() -> AsyncIterator[str]:
    """A JetStream stream of this test's own, deleted afterwards."""
    name = f"pstest_{secrets.token_hex(4)}"
    try:
        nc = await nats.connect(NATS_URL, connect_timeout=2, allow_reconnect=False)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"NATS at {NATS_URL} is required: {exc}")
    await nc.close()
    yield name
    nc = await nats.connect(NATS_URL, connect_timeout=2, allow_reconnect=False)
    with contextlib.suppress(Exception):
        await nc.jetstream().delete_stream(name)
    await nc.close()


@contextlib.asynccontextmanager
async def two_nodes(database_url: str, name: str, a_broker: str, b_broker: str | None = None,
                    env: dict[str, str] | None = None) -> AsyncIterator[tuple[Paystream, Paystream]]:
    """Nodes A and B on one database and one stream, A reaching NATS at `a_broker` and B at
    `b_broker` (default: the same), with `env` besides; clients of each; both stopped afterwards."""
    servers = [Server(database_url, {"PAYSTREAM_BROKER": broker, "PAYSTREAM_BROKER_NAME": name,
                                     "PAYSTREAM_SSE_PING": "1", **(env or {})})
               for broker in (a_broker, b_broker or a_broker)]
    try:
        await asyncio.gather(*(asyncio.to_thread(s.start) for s in servers))
        async with Paystream(servers[0]) as pa, Paystream(servers[1]) as pb:
            yield pa, pb
    finally:
        for server in servers:
            server.stop()


async def metric(ps: Paystream, name: str) -> float:
    text = (await ps.http.get("/metrics")).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


async def stored_messages(url: str, name: str) -> int:
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    try:
        return (await nc.jetstream().stream_info(name)).state.messages
    finally:
        await nc.close()


async def outbox(db: asyncpg.Connection) -> int:
    return await db.fetchval("SELECT count(*) FROM broker_outbox")


async def outbox_empty(db: asyncpg.Connection) -> bool:
    return await outbox(db) == 0


async def listeners(db: asyncpg.Connection) -> int:
    return await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                             " AND (application_name = 'paystream-listener' OR query ILIKE 'LISTEN%')")


async def collect(stream: SSE, until: str = "succeeded", timeout: float = 30) -> list[tuple[int, str]]:
    """(seq, status) of every event until `until`; then the server must end the stream with
    nothing more (a final status ends it), so a repeat of the last event would show too."""
    seen: list[tuple[int, str]] = []
    async with asyncio.timeout(timeout):
        while True:
            frame = await stream.event(timeout=timeout)
            assert frame is not None, f"stream ended after {seen}"
            body = frame.json
            seen.append((body["seq"], body["status"]))
            if body["status"] == until:
                break
    seen += [(f.json["seq"], f.json["status"]) for f in await stream.rest(timeout=timeout)]
    return seen


async def test_nodes_hear_each_other_through_nats_not_listen(
        database_url: str, db: asyncpg.Connection, stream_name: str) -> None:
    before = await listeners(db)  # the session's LISTEN server may share this database
    async with two_nodes(database_url, stream_name, NATS_URL) as (pa, pb):
        # The NATS nodes hold no LISTEN connection (a server stopped just before may still
        # be leaving: fewer is fine).
        assert await listeners(db) <= before
        pis = [trigger.stripe_id("pi_") for _ in range(5)]
        base = int(time.time())
        for pi in pis:
            await pa.deliver(pa.event(STEPS[0], pi, created=base))
        async with contextlib.AsyncExitStack() as stack:
            streams = [await stack.enter_async_context(pb.sse(pi)) for pi in pis]
            for s in streams:
                assert (await s.event()).json["seq"] == 1
            pushed_before = await metric(pb, "paystream_notifications_pushed_total")
            for k, step in enumerate(STEPS[1:], 1):
                for pi in pis:
                    await pa.deliver(pa.event(step, pi, created=base + k))
            for s in streams:
                assert await collect(s) == [(2, "processing"), (3, "succeeded")]
        # Node B pushed from the messages themselves (no log read), node A published them.
        assert await metric(pb, "paystream_notifications_pushed_total") - pushed_before == 10
        # Published by A after its commits, or by B's once-a-second claim if it came first.
        # The counter moves after the claim's commit, which can follow B's push: wait for it.
        async def all_published() -> bool:
            return (await metric(pa, "paystream_broker_published_total")
                    + await metric(pb, "paystream_broker_published_total")) >= 15

        await wait_until(all_published, what="15 publishes counted")
        await wait_until(lambda: outbox_empty(db), what="the outbox to empty")
        assert await stored_messages(NATS_URL, stream_name) == 15  # each event once
        assert (await pb.http.get("/readyz")).json()["checks"]["listener"] is True


async def test_with_nats_commits_notify_nothing_and_webhooks_to_the_backend_still_go(
        database_url: str, db: asyncpg.Connection, stream_name: str, local_stripe: LocalStripe) -> None:
    """The broker's point is commits without Postgres's NOTIFY lock: not even the outbound
    webhooks' wake-up NOTIFYs; their deliverer is woken by the process that publishes."""
    backend = Backend()
    await backend.start()
    heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    listener = await asyncpg.connect(database_url)
    for channel in (CHANNEL, OUTBOUND_CHANNEL):
        await listener.add_listener(channel, lambda _c, _pid, ch, payload: heard.put_nowait((ch, payload)))
    try:
        async with two_nodes(database_url, stream_name, NATS_URL,
                             env=outbound_env(backend, local_stripe, scale=0.0005)) as (pa, pb):
            pis = [trigger.stripe_id("pi_") for _ in range(4)]
            base = int(time.time())
            for k, step in enumerate(STEPS):
                for n, pi in enumerate(pis):
                    ps = (pa, pb)[n % 2]
                    await ps.deliver(ps.event(step, pi, created=base + k))
            txns = set(await db.fetchval("SELECT array_agg(id) FROM transactions WHERE stripe_id = ANY($1)", pis))
            expected = {(txn, seq) for txn in txns for seq in (1, 2, 3)}

            async def delivered() -> bool:
                return await db.fetchval("SELECT count(*) FROM outbound_deliveries WHERE transaction_id = ANY($1)"
                                         " AND delivered_at IS NOT NULL", list(txns)) == len(expected)

            await wait_until(delivered, timeout=20, what="every logged event delivered to the backend")
            assert set(backend.accepted()) == expected
        # Notifications arrive in commit order: once this one is heard, any the nodes'
        # commits sent would have been heard before it.
        await db.execute("SELECT pg_notify($1, 'sentinel')", OUTBOUND_CHANNEL)
        got = []
        while (item := await asyncio.wait_for(heard.get(), 5)) != (OUTBOUND_CHANNEL, "sentinel"):
            got.append(item)
        # The main channel may carry another node's changes (the session's LISTEN server).
        ours = [(ch, p) for ch, p in got if ch == OUTBOUND_CHANNEL or any(txn in p for txn in txns)]
        assert ours == [], f"NOTIFYs sent by the NATS nodes' commits: {ours[:5]}"
    finally:
        await listener.close()
        await backend.stop()


async def test_a_node_starting_beside_nodes_on_another_engine_names_them(
        database_url: str, db: asyncpg.Connection, stream_name: str) -> None:
    """Nodes on LISTEN and on NATS (or on two NATS streams) sharing a database never hear
    each other's changes: whichever starts later says so in one ERROR line."""
    def engine_errors(server: Server) -> list[str]:
        lines = server.log_path.read_text().splitlines()
        return [line for line in lines if "another fan-out engine" in line]

    listen = Server(database_url, {})
    on_nats = Server(database_url, {"PAYSTREAM_BROKER": NATS_URL, "PAYSTREAM_BROKER_NAME": stream_name})
    listen_later = Server(database_url, {})
    other_stream = Server(database_url, {"PAYSTREAM_BROKER": NATS_URL, "PAYSTREAM_BROKER_NAME": stream_name + "x"})
    # The session's LISTEN server may share this database.
    before = await db.fetchval("SELECT count(*) FROM pg_stat_activity"
                               " WHERE datname = current_database() AND application_name = 'paystream-listener'")
    try:
        await asyncio.to_thread(listen.start)
        await asyncio.to_thread(on_nats.start)
        [line] = engine_errors(on_nats)
        assert f"LISTEN/NOTIFY (no PAYSTREAM_BROKER) ({before + 1} connection" in line
        assert f"this node is on NATS stream '{stream_name}'." in line and f"stream '{stream_name}' (" not in line

        await asyncio.to_thread(listen_later.start)
        [line] = engine_errors(listen_later)
        assert f"NATS stream '{stream_name}' (" in line and "LISTEN/NOTIFY (no PAYSTREAM_BROKER) (" not in line

        await asyncio.to_thread(other_stream.start)
        [line] = engine_errors(other_stream)
        assert f"NATS stream '{stream_name}' (" in line and f"LISTEN/NOTIFY (no PAYSTREAM_BROKER) ({before + 2} connections)" in line
        assert engine_errors(listen) == []  # the first node saw nothing to warn of
    finally:
        for server in (other_stream, listen_later, on_nats, listen):
            server.stop()
        nc = await nats.connect(NATS_URL, connect_timeout=2, allow_reconnect=False)
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(stream_name + "x")
        await nc.close()


class PausableProxy:
    """A TCP relay to NATS whose client-to-server direction can be held: what the node
    sends (its publishes) waits in the relay, so the node commits but cannot publish."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.removeprefix("nats://").partition(":")
        self.upstream = (host, int(port))
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def __aenter__(self) -> PausableProxy:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, held: bool) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    if held:
                        await self.flowing.wait()
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))


async def test_an_event_committed_by_a_process_killed_before_publishing_is_still_delivered(
        database_url: str, db: asyncpg.Connection, stream_name: str) -> None:
    async with PausableProxy(NATS_URL) as proxy:
        async with two_nodes(database_url, stream_name, proxy.url, NATS_URL) as (pa, pb):
            pi = trigger.stripe_id("pi_")
            base = int(time.time())
            await pa.deliver(pa.event(STEPS[0], pi, created=base))
            async with pb.sse(pi) as stream:
                assert (await stream.event()).json["seq"] == 1
                proxy.flowing.clear()  # A's publishes now go nowhere
                await pa.deliver(pa.event(STEPS[2], pi, created=base + 2))  # 200: committed

                async def claimed_by_a() -> bool:
                    # Queued, and held by a claim that has waited for its acknowledgement
                    # for a while: A's (B's publishes are acknowledged at once), so no one
                    # else can publish it meanwhile.
                    return await outbox(db) == 1 and await db.fetchval(
                        """SELECT count(*) FROM pg_stat_activity
                            WHERE datname = current_database() AND state = 'idle in transaction'
                              AND query LIKE '%broker_outbox%SKIP LOCKED%'
                              AND clock_timestamp() - state_change > interval '300 ms'""") == 1

                await wait_until(claimed_by_a, what="A to claim the committed event", timeout=15)
                pa.server.proc.send_signal(signal.SIGKILL)  # between commit and publish
                pa.server.proc.wait(10)
                # B relays it (within a second of A's claim ending with its connection).
                assert await collect(stream, timeout=15) == [(2, "succeeded")]
            await wait_until(lambda: outbox_empty(db), what="the outbox to empty")
            assert await stored_messages(NATS_URL, stream_name) == 2


@contextlib.contextmanager
def own_nats(port: int, store: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([NATS_SERVER, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", store],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


async def nats_up(url: str) -> bool:
    try:
        nc = await nats.connect(url, connect_timeout=1, allow_reconnect=False)
    except Exception:  # noqa: BLE001
        return False
    await nc.close()
    return True


@pytest.mark.parametrize("storage", ["kept", "lost"])
async def test_nats_restarted_mid_burst_loses_and_doubles_nothing(
        database_url: str, db: asyncpg.Connection, storage: str) -> None:
    """SIGKILL the nats-server while webhooks to two nodes are being answered, then start it
    again: on the same storage, or on none (the stream is gone and is made again)."""
    port, store = free_port(), tempfile.mkdtemp(prefix="paystream-nats-")
    url = f"nats://127.0.0.1:{port}"
    name = f"pstest_{secrets.token_hex(4)}"
    count = 20
    with own_nats(port, store) as first:
        await wait_until(lambda: nats_up(url), what="nats-server")
        try:
            async with two_nodes(database_url, name, url) as (pa, pb), contextlib.AsyncExitStack() as stack:
                pis = [trigger.stripe_id("pi_") for _ in range(count)]
                base = int(time.time())
                for pi in pis:
                    await pa.deliver(pa.event(STEPS[0], pi, created=base))
                # Half the browsers on each node; every webhook to the other one.
                streams = [await stack.enter_async_context((pb if i % 2 else pa).sse(pi))
                           for i, pi in enumerate(pis)]
                for s in streams:
                    assert (await s.event()).json["seq"] == 1
                results = [asyncio.create_task(collect(s, timeout=60)) for s in streams]
                answered = 0
                halfway = asyncio.Event()

                async def stripe(i: int, pi: str) -> None:
                    nonlocal answered
                    ps = pa if i % 2 else pb
                    for step in (1, 2):
                        await ps.deliver(ps.event(STEPS[step], pi, created=base + step))
                        answered += 1
                        if answered == count:
                            halfway.set()

                senders = [asyncio.create_task(stripe(i, pi)) for i, pi in enumerate(pis)]
                await halfway.wait()
                first.send_signal(signal.SIGKILL)  # half the webhooks answered, half to come
                first.wait()
                await asyncio.gather(*senders)  # committed whether NATS is there or not
                if storage == "lost":
                    shutil.rmtree(store)
                with own_nats(port, store):
                    for seen in await asyncio.gather(*results):
                        assert seen == [(2, "processing"), (3, "succeeded")]
                    await wait_until(lambda: outbox_empty(db), what="the outbox to empty", timeout=20)
                    assert (await pa.http.get("/readyz")).status_code == 200
                    # One reconnect per node: a closed connection's callbacks don't start more.
                    assert await metric(pa, "paystream_listener_reconnects_total") == 1
                    assert await metric(pb, "paystream_listener_reconnects_total") == 1
        finally:
            shutil.rmtree(store, ignore_errors=True)


async def test_a_stream_deleted_under_connected_nodes_is_made_again_and_nothing_is_missed(
        database_url: str, db: asyncpg.Connection, stream_name: str) -> None:
    async with two_nodes(database_url, stream_name, NATS_URL) as (pa, pb):
        pi = trigger.stripe_id("pi_")
        base = int(time.time())
        await pa.deliver(pa.event(STEPS[0], pi, created=base))
        async with pb.sse(pi) as stream:
            assert (await stream.event()).json["seq"] == 1
            await pa.deliver(pa.event(STEPS[1], pi, created=base + 1))
            assert (await stream.event()).json["seq"] == 2
            nc = await nats.connect(NATS_URL, connect_timeout=2, allow_reconnect=False)
            try:
                assert await nc.jetstream().delete_stream(stream_name)
            finally:
                await nc.close()
            await pa.deliver(pa.event(STEPS[2], pi, created=base + 2))
            # Both nodes notice (a publish finds no stream; the stream check sees it gone
            # or made again), reconnect, and B catches its subscriber up.
            assert await collect(stream, timeout=30) == [(3, "succeeded")]
        await wait_until(lambda: outbox_empty(db), what="the outbox to empty")
