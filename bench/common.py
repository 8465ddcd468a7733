"""What every load generator here shares: percentiles, machine facts, a server (or a
fleet of them) to test, seeding, database and /metrics readings."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import resource
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
from clients import HttpGetter

RESULTS = Path(__file__).resolve().parent / "results"

# A Postgres 15 backend reports its counters to pg_stat_database up to 10 s after it goes
# idle, so a window opened sooner would count the set-up's queries as the waiting ones.
STATS_LAG = 11.0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def summary(values_ms: list[float]) -> dict[str, float]:
    if not values_ms:
        return {}
    return {f"p{p}": round(percentile(values_ms, p), 3) for p in (50, 90, 99)} | {
        "max": round(max(values_ms), 3), "mean": round(sum(values_ms) / len(values_ms), 3)}


def machine() -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version()}


def save(name: str, line: dict[str, object], samples_ms: list[float] | None = None) -> None:
    """bench/results/NAME.json: the printed line plus raw latency samples, for report.py."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({**line, "samples_ms": samples_ms or []}))


def raise_open_files() -> int:
    """This process's open-file limit raised to its hard limit (each client socket is a
    file); returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def start_nodes(database_url: str, count: int, env: dict[str, str]) -> list[object]:
    """`count` × `paystream serve` on one database, sharing one Stripe endpoint secret and
    one token secret (a fleet behind one load balancer), started in turn."""
    from tests.harness import Server

    servers = [Server(database_url, env) for _ in range(count)]
    first = servers[0]
    try:
        for server in servers:
            server.webhook_secret, server.token_secret = first.webhook_secret, first.token_secret
            server.env.update({"STRIPE_WEBHOOK_SECRET": first.env["STRIPE_WEBHOOK_SECRET"],
                               "PAYSTREAM_TOKEN_SECRET": first.token_secret})
            server.start()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


@contextlib.contextmanager
def fleet(nodes: int, clients: int = 0, pg: str = "system", **env: str) -> Iterator[tuple[list[object], object]]:
    """A fresh database and `nodes` × `paystream serve` on it, with uvloop for the client
    side; removed afterwards. `clients` (per node) raises the per-address stream limit
    above it."""
    import uvloop

    from tests.harness import FreshDatabase

    database = FreshDatabase(pg)
    if clients:
        # Every client comes from 127.0.0.1: raise the per-address stream and connection caps.
        env = {"PAYSTREAM_MAX_STREAMS_PER_ADDRESS": str(clients + 100),
               "PAYSTREAM_MAX_CONNECTIONS_PER_ADDRESS": str(clients + 1000), **env}
    try:
        servers = start_nodes(database.url, nodes, env)
    except BaseException:
        database.drop()
        raise
    uvloop.install()
    try:
        yield servers, database
    finally:
        for server in servers:
            server.stop()
        database.drop()


@contextlib.contextmanager
def paystream(clients: int = 0, pg: str = "system", **env: str) -> Iterator[tuple[object, object]]:
    """A fresh database and `paystream serve` for one scenario, with uvloop for the client
    side; removed afterwards. `clients` raises the per-address stream limit above it."""
    with fleet(1, clients, pg, **env) as (servers, database):
        yield servers[0], database


async def seed(database_url: str, n: int) -> list[str]:
    """N transactions in `processing`, written straight to the database (set-up, not measured)."""
    from paystream.changes import store
    from paystream.dev import trigger

    conn = await asyncpg.connect(database_url)
    await store.init_connection(conn)
    pis = [trigger.stripe_id("pi_") for _ in range(n)]
    async with conn.transaction():
        rows = []
        for pi in pis:
            row = await store.insert_transaction(conn, stripe_id=pi, kind="payment", status="processing",
                                                 amount=1500, currency="usd", customer_id=None, metadata={})
            rows.append(row)
        for row in rows:
            await store.append_event(conn, row, previous_status=None, stripe_event_id=None, event_type="bench")
    await conn.close()
    return pis


async def db_queries(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("SELECT xact_commit + xact_rollback FROM pg_stat_database"
                                   " WHERE datname = current_database()")
    finally:
        await conn.close()


async def db_rate(database_url: str, seconds: float) -> float:
    """Database transactions per second over a window (a measurement, not a wait)."""
    q0, t0 = await db_queries(database_url), time.perf_counter()
    await asyncio.sleep(seconds)
    q1, t1 = await db_queries(database_url), time.perf_counter()
    return (q1 - q0 - 1) / (t1 - t0)  # minus the first read's own transaction


async def scrape(port: int) -> dict[str, float]:
    """Every sample on the server's /metrics, keyed by name{labels}."""
    getter = HttpGetter("127.0.0.1", port)
    try:
        text = await getter.get_text("/metrics")
    finally:
        getter.close()
    return {key: float(value) for line in text.splitlines() if line and not line.startswith("#")
            for key, value in [line.rsplit(" ", 1)]}


def bucket_delta(before: dict[str, float], after: dict[str, float], prefix: str) -> dict[str, float]:
    """A histogram's cumulative bucket counts between two scrapes, by `le`."""
    return {key.split('le="', 1)[1].split('"', 1)[0]: after[key] - before.get(key, 0)
            for key in after if key.startswith(prefix)}


def longest(buckets: dict[str, float]) -> str:
    """The smallest bucket bound that holds every observation: "≤ 0.05 s"."""
    total = buckets.get("+Inf", 0)
    if not total:
        return "none"
    for le in sorted((b for b in buckets if b != "+Inf"), key=float):
        if buckets[le] >= total:
            return f"≤ {le} s"
    return "> the largest bucket"


async def open_all(keys: list[str], opener: Callable[[str], Awaitable[object]],
                   at_once: int = 200) -> tuple[dict[str, object], float]:
    """Open a client per key, `at_once` at a time; the clients by key, and the seconds it took."""
    clients: dict[str, object] = {}
    sem = asyncio.Semaphore(at_once)
    start = time.perf_counter()

    async def one(key: str) -> None:
        async with sem:
            clients[key] = await opener(key)

    await asyncio.gather(*(one(key) for key in keys))
    return clients, time.perf_counter() - start
