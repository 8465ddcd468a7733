"""S5, database reads per push: one transaction watched from 3 nodes (each `paystream
serve`, one database) × 300 SSE subscribers, 20 events.  Run twice in the same process:
notifications that carry only a pointer (PAYSTREAM_NOTIFY_EVENTS=0, as before: every node
reads the log per event) and ones that carry the pushed event (the default).  Counts
reads of the event log from the nodes' own counter (paystream_log_reads_total) and from
Postgres (pg_stat_user_tables index and sequential scans of transaction_events, after
the statistics are flushed).  Prints one JSON line.

    .venv/bin/python bench/s5_reads_per_push.py [--nodes 3] [--subscribers 300] [--events 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import asyncpg
import httpx

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, and the root for tests.harness

from clients import SSEStream, WebhookSender  # noqa: E402
from common import machine, save, start_nodes  # noqa: E402

from paystream.auth import tokens  # noqa: E402
from paystream.dev import trigger  # noqa: E402
from tests.harness import FreshDatabase, Server  # noqa: E402

STATS_FLUSH = 11.0  # Postgres 15 flushes an idle backend's statistics within 10 s


async def log_scans(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("""SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0)
                                        FROM pg_stat_user_tables WHERE relname = 'transaction_events'""")
    finally:
        await conn.close()


def node_reads(server: Server) -> float:
    for line in httpx.get(f"{server.base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("paystream_log_reads_total "):
            return float(line.split()[1])
    return 0.0


async def scenario(servers: list[Server], url: str, subscribers: int, events: int) -> dict:
    pi = trigger.stripe_id("pi_")
    sender = WebhookSender("127.0.0.1", servers[0].port, servers[0].webhook_secret)
    await sender.send(trigger.build("payment_intent.succeeded", pi, amount=100000))
    streams = []
    for server in servers:
        token = tokens.mint(server.token_secret, txn=[pi], ttl_seconds=3600)[0]
        for _ in range(subscribers):
            stream = await SSEStream.open("127.0.0.1", server.port,
                                          f"/v1/transactions/{pi}/events?token={token}&follow=true")
            assert (await stream.next_event()).event == "snapshot"
            streams.append(stream)
    await asyncio.sleep(STATS_FLUSH)  # let the opening reads reach pg_stat before counting
    scans0, reads0 = await log_scans(url), sum(node_reads(s) for s in servers)
    got = [0] * len(streams)

    async def read(i: int) -> None:
        for _ in range(events):
            assert await streams[i].next_event() is not None
            got[i] += 1

    readers = [asyncio.create_task(read(i)) for i in range(len(streams))]
    sender.close()  # idle for longer than the server's keep-alive: a fresh connection
    sender = WebhookSender("127.0.0.1", servers[0].port, servers[0].webhook_secret)
    for k in range(1, events + 1):
        status, _ = await sender.send(trigger.build("charge.refunded", pi, amount=100000, amount_refunded=k * 100))
        assert status == 200
    await asyncio.wait_for(asyncio.gather(*readers), 120)
    reads = sum(node_reads(s) for s in servers) - reads0
    await asyncio.sleep(STATS_FLUSH)
    scans = await log_scans(url) - scans0
    for stream in streams:
        stream.close()
    sender.close()
    return {"log_reads_per_push_by_nodes": round(reads / events, 3), "log_scans_per_push_by_postgres": round(scans / events, 3),
            "deliveries": sum(got), "every_subscriber_got_every_event": all(g == events for g in got)}


def run(nodes: int, subscribers: int, events: int, notify_events: bool) -> dict:
    database = FreshDatabase("system")
    env = {"PAYSTREAM_NOTIFY_EVENTS": "1" if notify_events else "0",
           "PAYSTREAM_MAX_STREAMS_PER_ADDRESS": str(subscribers + 100),
           "PAYSTREAM_MAX_STREAMS_PER_TOKEN": str(subscribers + 100)}
    try:
        servers = start_nodes(database.url, nodes, env)  # one Stripe endpoint for the fleet
    except BaseException:
        database.drop()
        raise
    try:
        return asyncio.run(scenario(servers, database.url, subscribers, events))
    finally:
        for server in servers:
            server.stop()
        database.drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--subscribers", type=int, default=300, help="per node")
    parser.add_argument("--events", type=int, default=20)
    args = parser.parse_args()
    started = time.time()
    pointer = run(args.nodes, args.subscribers, args.events, notify_events=False)
    carried = run(args.nodes, args.subscribers, args.events, notify_events=True)
    line = {"scenario": "s5_reads_per_push", "nodes": args.nodes, "subscribers_per_node": args.subscribers,
            "events": args.events, "pointer_notifications": pointer, "event_in_notification": carried,
            "seconds": round(time.time() - started, 1), "machine": machine()}
    save("s5_reads_per_push", line)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
