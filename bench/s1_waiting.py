"""S1, waiting browsers: N concurrent SSE (or WebSocket) subscribers on distinct
transactions, then signed webhooks at a fixed rate moving each to `succeeded`.

Prints one JSON line: webhook-ack and webhook-sent → subscriber-received latency
(p50/p90/p99/max), server RSS per idle connection, server CPU while idle and while
pushing, database queries per second while the subscribers wait, and whether any event
was lost or duplicated.  The client runs in this process, the server in another (the
open-file limit here is 20,000 per process).

    .venv/bin/python bench/s1_waiting.py [--subscribers 10000] [--rate 200] [--transport sse|ws] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from pathlib import Path

import psutil

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, and the root for tests.harness

from clients import WebhookSender, await_final_push, open_waiting, send_paced  # noqa: E402
from common import (  # noqa: E402
    STATS_LAG,
    bucket_delta,
    db_rate,
    longest,
    machine,
    open_all,
    paystream,
    save,
    scrape,
    seed,
    summary,
)

from paystream.auth import tokens  # noqa: E402
from paystream.dev import trigger  # noqa: E402
from tests.harness import Server  # noqa: E402


class WsClient:
    """One WebSocket per subscriber (as one browser tab each)."""

    def __init__(self, ws: object) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, port: int, pi: str, token: str) -> WsClient:
        import websockets

        ws = await websockets.connect(f"ws://127.0.0.1:{port}/v1/ws?token={token}", ping_interval=None,
                                      max_queue=16)
        await ws.send(json.dumps({"op": "subscribe", "id": pi}))
        return cls(ws)

    async def next_event(self) -> tuple[int, str] | None:
        msg = json.loads(await self.ws.recv())
        return msg["seq"], msg["data"]["status"]

    def close(self) -> None:
        asyncio.ensure_future(self.ws.close())


async def run(server: Server, database_url: str, n: int, rate: float, transport: str,
              idle_window: float, baseline: bool = True) -> dict[str, object]:
    proc = psutil.Process(server.proc.pid)
    pis = await seed(database_url, n)
    rss_before = proc.memory_info().rss
    before_qps = None
    if baseline:
        # What the server costs the database with nobody waiting (its listener's health
        # check, the sweeper): subtracted below, so what is left is the subscribers' cost.
        await asyncio.sleep(STATS_LAG)
        before_qps = await db_rate(database_url, 5)

    # Open every subscriber and read its snapshot.
    async def open_one(pi: str) -> object:
        if transport == "sse":
            return await open_waiting("127.0.0.1", server.port, pi, server.token_secret)
        token = tokens.mint(server.token_secret, txn=[pi], ttl_seconds=3600)[0]
        client = await WsClient.open(server.port, pi, token)
        assert (await client.next_event())[0] == 1
        return client

    clients, open_seconds = await open_all(pis, open_one)
    # This process's own 10,000 client streams are frozen out of its garbage collector, so
    # that its pauses are not counted as the server's latency.
    gc.freeze()
    # The opening's counters reach pg_stat_database (a backend reports them up to 10 s after it
    # goes idle: S4, which has no baseline, waited 2 s and counted 1,000 opens as 32 xact/s).
    await asyncio.sleep(STATS_LAG)
    rss_open = proc.memory_info().rss
    # An idle window: what do N waiting browsers cost?  A full run spans a whole SSE ping
    # interval (15 s), so every stream's keep-alive is counted.
    cpu0, t0, m0 = proc.cpu_times(), time.perf_counter(), await scrape(server.port)
    idle_qps = await db_rate(database_url, idle_window)
    cpu1, t1, m1 = proc.cpu_times(), time.perf_counter(), await scrape(server.port)
    idle_cpu = ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / (t1 - t0)

    # Receivers: each stamps its event on arrival.
    received: dict[str, float] = {}
    bad: list[str] = []

    async def receive(pi: str) -> None:
        received[pi], ok = await await_final_push(clients[pi], sse=transport == "sse")
        if not ok:
            bad.append(pi)

    receivers = [asyncio.create_task(receive(pi)) for pi in pis]

    # Webhooks at `rate` per second from a few keep-alive connections.
    senders = [WebhookSender("127.0.0.1", server.port, server.webhook_secret) for _ in range(8)]
    requests = {pi: senders[0].prepare(trigger.build("payment_intent.succeeded", pi)) for pi in pis}
    await asyncio.gather(*(s.connect() for s in senders))
    m2 = await scrape(server.port)
    cpu2, t2 = proc.cpu_times(), time.perf_counter()
    sent, acks = await send_paced([senders], pis, requests, rate)
    await asyncio.wait_for(asyncio.gather(*receivers), 120)
    cpu3, t3 = proc.cpu_times(), time.perf_counter()
    m3 = await scrape(server.port)
    handed = bucket_delta(m2, m3, "paystream_webhook_to_push_seconds_bucket{")
    total = handed.get("+Inf", 0) or 1
    full_gc = 'paystream_gc_pause_seconds_bucket{generation="2",'
    for s in senders:
        s.close()
    for c in clients.values():
        c.close()
    push = [(received[pi] - sent[pi]) * 1000 for pi in pis if pi in received and pi in sent]
    return {
        "subscribers": n, "transport": transport, "webhook_rate_per_s": rate,
        "open_seconds": round(open_seconds, 2),
        "webhook_ack_ms": summary(acks),
        "webhook_sent_to_subscriber_received_ms": summary(push),
        # The server's own view (paystream_webhook_to_push_seconds): the share of changes
        # handed to their subscribers within 5 and 25 ms of being written.
        "server_write_to_handoff_share": {"le_5ms": round(handed.get("0.005", 0) / total, 4),
                                          "le_25ms": round(handed.get("0.025", 0) / total, 4)},
        "server_rss_mb": {"before": round(rss_before / 2**20, 1), "with_subscribers": round(rss_open / 2**20, 1)},
        "server_rss_kb_per_idle_connection": round((rss_open - rss_before) / n / 1024, 2),
        "server_cpu_idle_cores": round(idle_cpu, 3),
        "idle_window_seconds": idle_window,
        "server_cpu_while_pushing_cores": round(((cpu3.user + cpu3.system) - (cpu2.user + cpu2.system)) / (t3 - t2), 3),
        # Transactions/s in the database while N subscribers waited; with a baseline, less
        # what the server cost with none waiting (db_queries_per_s_while_waiting).
        "db_xacts_per_s_before_subscribers": None if before_qps is None else round(before_qps, 2),
        "db_xacts_per_s_while_waiting": round(idle_qps, 2),
        "db_queries_per_s_while_waiting": (None if before_qps is None
                                           else round(max(idle_qps - before_qps, 0), 2)),
        "full_gc": {"idle": {"count": bucket_delta(m0, m1, full_gc).get("+Inf", 0),
                             "longest": longest(bucket_delta(m0, m1, full_gc))},
                    "pushing": {"count": bucket_delta(m2, m3, full_gc).get("+Inf", 0),
                                "longest": longest(bucket_delta(m2, m3, full_gc))}},
        "lost": n - len(received), "wrong_or_duplicated": len(bad),
        "no_loss_no_duplicates": len(received) == n and not bad,
        "samples_ms": push,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=10000)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--transport", choices=["sse", "ws"], default="sse")
    parser.add_argument("--pg", choices=["system", "embedded"], default="system")
    parser.add_argument("--quick", action="store_true", help="1,000 subscribers")
    args = parser.parse_args()
    n = 1000 if args.quick else args.subscribers
    # The server as shipped; only the per-address limit one test client trips is raised.
    with paystream(clients=n, pg=args.pg) as (server, database):
        result = asyncio.run(run(server, database.url, n, args.rate, args.transport, 5 if args.quick else 16))
    samples = result.pop("samples_ms")
    line = {"bench": "s1_waiting", **result, "machine": machine()}
    print(json.dumps(line))
    save(f"s1_waiting_{args.transport}", line, samples)
    return 0 if result["no_loss_no_duplicates"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
