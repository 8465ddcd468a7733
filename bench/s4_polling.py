"""S4, the baselines: the same waiting browsers served by (a) polling paystream's GET every
2 s and (b) a server-side long-poll that re-reads the database every 500 ms
(baseline_server.py), next to paystream's push (SSE).  For each: webhook-sent →
browser-knows latency, and database transactions per second spent while nobody pays.

    .venv/bin/python bench/s4_polling.py [--clients 1000] [--rate 200] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, and the root for tests.harness

from clients import HttpGetter, WebhookSender  # noqa: E402
from common import db_rate, machine, paystream, save, seed, summary  # noqa: E402
from s1_waiting import run as run_push  # noqa: E402

from paystream.auth import tokens  # noqa: E402
from paystream.dev import trigger  # noqa: E402
from tests.harness import Server, free_port  # noqa: E402

IDLE_WINDOW = 5.0


async def drive(server: Server, database_url: str, pis: list[str], rate: float, waiter) -> dict[str, object]:  # noqa: ANN001
    """Start one waiter per transaction, measure the idle cost, then send the webhooks."""
    seen: dict[str, float] = {}
    started = asyncio.Event()
    tasks = [asyncio.create_task(waiter(pi, seen, started)) for pi in pis]
    await asyncio.sleep(3)  # every waiter has made its first request (load ramp, not a synchronisation)
    waiting_qps = await db_rate(database_url, IDLE_WINDOW)  # the idle window being measured
    senders = [WebhookSender("127.0.0.1", server.port, server.webhook_secret) for _ in range(4)]
    sent: dict[str, float] = {}
    t2 = time.perf_counter()
    queue = list(pis)

    async def lane(k: int, sender: WebhookSender) -> None:
        for i in range(k, len(queue), len(senders)):
            delay = t2 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the load
            request = sender.prepare(trigger.build("payment_intent.succeeded", queue[i]))
            sent[queue[i]] = time.perf_counter()
            status, _ = await sender.send(request)
            assert status == 200

    await asyncio.gather(*(lane(k, s) for k, s in enumerate(senders)))
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    for s in senders:
        s.close()
    latencies = [(seen[pi] - sent[pi]) * 1000 for pi in pis if pi in seen]
    return {"latency_ms": summary(latencies), "db_xact_per_s_while_waiting": round(waiting_qps, 1),
            "lost": len(pis) - len(seen), "samples_ms": latencies}


def browser_polling(server: Server, interval: float = 2.0):  # noqa: ANN201
    async def waiter(pi: str, seen: dict[str, float], started: asyncio.Event) -> None:
        client = HttpGetter("127.0.0.1", server.port)
        token = tokens.mint(server.token_secret, txn=[pi], ttl_seconds=3600)[0]
        await asyncio.sleep(random.random() * interval)  # browsers start at random phases
        while True:
            _, tx = await client.get(f"/v1/transactions/{pi}?token={token}")
            if tx.get("status") == "succeeded":
                seen[pi] = time.perf_counter()
                client.close()
                return
            await asyncio.sleep(interval)  # the polling interval under test
    return waiter


def server_long_poll(port: int):  # noqa: ANN201
    async def waiter(pi: str, seen: dict[str, float], started: asyncio.Event) -> None:
        client = HttpGetter("127.0.0.1", port)
        while True:
            _, body = await client.get(f"/poll/{pi}?since=processing")
            if body.get("status") == "succeeded":
                seen[pi] = time.perf_counter()
                client.close()
                return
    return waiter


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--quick", action="store_true", help="200 clients")
    args = parser.parse_args()
    n = 200 if args.quick else args.clients
    results: dict[str, dict[str, object]] = {}
    with paystream(clients=n) as (server, database):
        port = free_port()
        baseline = subprocess.Popen([sys.executable, str(Path(__file__).with_name("baseline_server.py")), str(port)],
                                    env={**os.environ, "DATABASE_URL": database.url})
        try:
            for _ in range(100):
                try:
                    httpx.get(f"http://127.0.0.1:{port}/poll/none?since=x", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)  # another process's start-up
            else:
                raise RuntimeError("the baseline server did not start")

            async def all_modes() -> None:
                pis = await seed(database.url, n)
                results["browser_poll_2s"] = await drive(server, database.url, pis, args.rate, browser_polling(server))
                pis = await seed(database.url, n)
                results["server_reread_500ms"] = await drive(server, database.url, pis, args.rate,
                                                             server_long_poll(port))
                # Every design's figure is the database's whole rate in the window (for push:
                # the server's listener health check, and nothing per subscriber).
                push = await run_push(server, database.url, n, args.rate, "sse", IDLE_WINDOW, baseline=False)
                results["paystream_sse"] = {"latency_ms": push["webhook_sent_to_subscriber_received_ms"],
                                            "db_xact_per_s_while_waiting": push["db_xacts_per_s_while_waiting"],
                                            "lost": push["lost"], "samples_ms": push["samples_ms"]}

            asyncio.run(all_modes())
        finally:
            baseline.terminate()
    ok = all(r["lost"] == 0 for r in results.values())
    for mode, r in results.items():
        samples = r.pop("samples_ms")
        line = {"bench": "s4_polling", "mode": mode, "clients": n, "webhook_rate_per_s": args.rate, **r,
                "machine": machine()}
        print(json.dumps(line))
        save(f"s4_{mode}", line, samples)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
