"""S2, fan-out: one transaction watched by N subscribers (an operator dashboard), then a
series of signed partial-refund webhooks, each pushed to every subscriber.

Prints one JSON line: webhook-sent → subscriber-received latency over every
(subscriber, event) pair, and whether each subscriber got every event once, in order.

    .venv/bin/python bench/s2_fanout.py [--subscribers 1000] [--events 20] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, and the root for tests.harness

from clients import SSEStream, WebhookSender  # noqa: E402
from common import machine, paystream, save, seed, summary  # noqa: E402

from paystream.auth import tokens  # noqa: E402
from paystream.dev import trigger  # noqa: E402
from tests.harness import Server  # noqa: E402


async def run(server: Server, database_url: str, n: int, events: int) -> dict[str, object]:
    [pi] = await seed(database_url, 1)
    # Streams are limited per token: each dashboard gets its own token.
    streams: list[SSEStream] = []
    sem = asyncio.Semaphore(200)

    async def open_one(k: int) -> None:
        own = tokens.mint(server.token_secret, txn=[pi, f"dashboard-{k}"], ttl_seconds=3600)[0]
        async with sem:
            stream = await SSEStream.open("127.0.0.1", server.port,
                                          f"/v1/transactions/{pi}/events?token={own}&follow=true")
            assert (await stream.next_event()).event == "snapshot"
        streams.append(stream)

    await asyncio.gather(*(open_one(k) for k in range(n)))
    sent: dict[int, float] = {}
    got: list[list[tuple[int, float]]] = [[] for _ in streams]

    async def read(i: int) -> None:
        for _ in range(events):
            ev = await streams[i].next_event()
            got[i].append((ev.id, time.perf_counter()))

    readers = [asyncio.create_task(read(i)) for i in range(len(streams))]
    sender = WebhookSender("127.0.0.1", server.port, server.webhook_secret)
    await sender.send(trigger.build("payment_intent.succeeded", pi, amount=100000))  # seq 2, before the series
    t0 = time.perf_counter()
    for k in range(1, events):
        due = t0 + k * 0.2
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # 5 events a second
        seq = 2 + k
        request = sender.prepare(trigger.build("charge.refunded", pi, amount=100000, amount_refunded=k * 100))
        sent[seq] = time.perf_counter()
        status, _ = await sender.send(request)
        assert status == 200
    await asyncio.wait_for(asyncio.gather(*readers), 120)
    sender.close()
    for s in streams:
        s.close()
    latencies = [(at - sent[seq]) * 1000 for per in got for seq, at in per if seq in sent]
    in_order = all([seq for seq, _ in per] == list(range(2, 2 + events)) for per in got)
    return {"subscribers": n, "events": events, "deliveries": len(latencies) + n,
            "webhook_sent_to_subscriber_received_ms": summary(latencies),
            "every_event_once_in_order": in_order, "samples_ms": latencies}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="200 subscribers, 10 events")
    args = parser.parse_args()
    n, events = (200, 10) if args.quick else (args.subscribers, args.events)
    with paystream(clients=n) as (server, database):
        result = asyncio.run(run(server, database.url, n, events))
    samples = result.pop("samples_ms")
    line = {"bench": "s2_fanout", **result, "machine": machine()}
    print(json.dumps(line))
    save("s2_fanout", line, samples)
    return 0 if result["every_event_once_in_order"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
