"""S7, the fan-out engines side by side in one run: Postgres LISTEN/NOTIFY (the default)
against NATS JetStream (PAYSTREAM_BROKER, on the machine's NATS at 127.0.0.1:4222).

For each engine:
- cross-node push latency: two `paystream serve` nodes on one fresh database, N SSE
  subscribers waiting on node B, signed webhooks at a fixed rate to node A only, so every
  push crosses nodes; webhook sent → subscriber received, p50/p99, every event once;
- Postgres connections per node while they wait (pg_stat_activity, by application name);
- commits per second with 8 writers: 8 connections in this process each committing, as
  fast as they can for a fixed time, the database transaction that logs a new
  transaction's first event exactly as the webhook path does (changes/store.py): with
  LISTEN it NOTIFYs; with NATS it queues an outbox row, and this process publishes the
  rows to JetStream after each commit as a node does (push/listener_nats.py), so the rate
  counts events committed *and* published.

Prints one JSON line.

    .venv/bin/python bench/s7_engines.py [--subscribers 300] [--events 300] [--rate 100] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from pathlib import Path

import asyncpg

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, and the root for tests.harness

from clients import WebhookSender, await_final_push, open_waiting, send_paced  # noqa: E402
from common import fleet, machine, save, seed, summary  # noqa: E402

from paystream import db  # noqa: E402
from paystream.changes import store  # noqa: E402
from paystream.dev import trigger  # noqa: E402
from paystream.push.listener_nats import NatsListener  # noqa: E402

NATS_URL = "nats://127.0.0.1:4222"
WRITERS = 8


async def connections_by_app(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("""SELECT application_name, count(*) AS n FROM pg_stat_activity
                                    WHERE datname = current_database() AND application_name LIKE 'paystream%'
                                    GROUP BY 1""")
        return {r["application_name"]: r["n"] for r in rows}
    finally:
        await conn.close()


async def cross_node(servers: list, url: str, subscribers: int, rate: float) -> dict:
    a, b = servers
    pis = await seed(url, subscribers)
    streams = [await open_waiting("127.0.0.1", b.port, pi, b.token_secret) for pi in pis]
    conns = await connections_by_app(url)
    senders = [WebhookSender("127.0.0.1", a.port, a.webhook_secret) for _ in range(4)]
    requests = {pi: senders[0].prepare(trigger.build("payment_intent.succeeded", pi)) for pi in pis}
    finals = [asyncio.create_task(await_final_push(s)) for s in streams]
    sent, acks = await send_paced([senders], pis, requests, rate)
    results = await asyncio.gather(*finals)
    for s in streams:
        s.close()
    for s in senders:
        s.close()
    latencies = [(arrived - sent[pi]) * 1000 for pi, (arrived, _) in zip(pis, results, strict=True)]
    return {"push_ms": summary(latencies), "ack_ms": summary(acks),
            "every_event_once": all(ok for _, ok in results),
            "postgres_connections_per_node": sum(conns.values()) / len(servers),
            "postgres_connections_by_app": conns}


async def writers(url: str, broker: bool, seconds: float) -> dict:
    """8 writers committing logged, announced events for `seconds`."""
    store.broker = broker
    listener: list[NatsListener] = []
    pool = await db.create_pool(url, WRITERS + 2, on_release=(lambda: listener[0].on_release()) if broker else None)
    name = f"bench_{secrets.token_hex(4)}"
    if broker:
        listener.append(NatsListener([NATS_URL], name, pool))

        async def catch_up() -> None:
            return None

        await listener[0].start(lambda *args: None, catch_up)
        assert await listener[0].wait_ready(10), "NATS not reachable"
    stop = time.perf_counter() + seconds
    counts = [0] * WRITERS

    async def writer(i: int) -> None:
        while time.perf_counter() < stop:
            async with pool.acquire() as conn, conn.transaction():
                row = await store.insert_transaction(conn, stripe_id=trigger.stripe_id("pi_"), kind="payment",
                                                     status="processing", amount=1500, currency="usd",
                                                     customer_id=None, metadata={})
                await store.append_event(conn, row, previous_status=None, stripe_event_id=None,
                                         event_type="bench")
            counts[i] += 1

    start = time.perf_counter()
    await asyncio.gather(*(writer(i) for i in range(WRITERS)))
    committed_s = time.perf_counter() - start
    result = {"commits": sum(counts), "commits_per_s": round(sum(counts) / committed_s)}
    if broker:
        async with pool.acquire() as conn:
            while await conn.fetchval("SELECT count(*) FROM broker_outbox"):  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # measuring when the backlog is gone, not synchronising
        published_s = time.perf_counter() - start
        result["published_per_s"] = round(sum(counts) / published_s)
        await listener[0].stop()
        await delete_stream(name)
    store.broker = False
    await pool.close()
    return result


async def engine_run(servers: list, url: str, args: argparse.Namespace, broker: bool) -> dict:
    result = await cross_node(servers, url, args.subscribers, args.rate)
    # The writers run alone: the nodes' once-a-second claim would publish their rows too.
    await asyncio.gather(*(asyncio.to_thread(s.stop) for s in servers))
    result["writers"] = await writers(url, broker, args.seconds)
    return result


async def delete_stream(name: str) -> None:
    import nats

    nc = await nats.connect(NATS_URL)
    await nc.jetstream().delete_stream(name)
    await nc.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subscribers", type=int, default=300)
    p.add_argument("--rate", type=float, default=100.0, help="webhooks per second to node A")
    p.add_argument("--seconds", type=float, default=10.0, help="how long the 8 writers write")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.subscribers, args.seconds = 50, 3.0
    line: dict = {"scenario": "s7_engines", "subscribers_on_b": args.subscribers, "rate": args.rate,
                  "writers": WRITERS, "writer_seconds": args.seconds, "machine": machine()}
    for engine, env in (("listen", {}), ("nats", {"PAYSTREAM_BROKER": NATS_URL,
                                                  "PAYSTREAM_BROKER_NAME": f"bench_{secrets.token_hex(4)}"})):
        with fleet(2, args.subscribers, **env) as (servers, database):
            line[engine] = asyncio.run(engine_run(servers, database.url, args, engine == "nats"))
        if engine == "nats":
            asyncio.run(delete_stream(env["PAYSTREAM_BROKER_NAME"]))
    line["nats_vs_listen"] = {
        "push_p50": round(line["nats"]["push_ms"]["p50"] / line["listen"]["push_ms"]["p50"], 2),
        "push_p99": round(line["nats"]["push_ms"]["p99"] / line["listen"]["push_ms"]["p99"], 2),
        "commits_per_s": round(line["nats"]["writers"]["commits_per_s"] / line["listen"]["writers"]["commits_per_s"], 2),
    }
    save("s7_engines", line)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
