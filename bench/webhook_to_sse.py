"""Webhook → SSE latency: how long after Stripe's POST leaves does the waiting browser know?

For each of --events transactions: an SSE client connects and reads its snapshot; then a
signed `payment_intent.succeeded` is POSTed and the clock runs until that client reads the
pushed `status` event.  --concurrency runs that many at once.  Prints one JSON line.
Every run checks that each subscriber got exactly one event (seq 2, succeeded) and then
the end of its stream: nothing lost, nothing duplicated.

    .venv/bin/python bench/webhook_to_sse.py [--events 1000] [--concurrency 1] [--pg system]
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
from common import machine, save, summary  # noqa: E402

from paystream.auth import tokens  # noqa: E402
from paystream.dev import trigger  # noqa: E402
from tests.harness import FreshDatabase, Server  # noqa: E402


async def run(server: Server, events: int, concurrency: int) -> dict[str, object]:
    host, port = "127.0.0.1", server.port
    pis = [trigger.stripe_id("pi_") for _ in range(events)]
    senders = [WebhookSender(host, port, server.webhook_secret) for _ in range(concurrency)]

    # Set-up (not measured): every transaction exists in `processing`.
    async def create(k: int) -> None:
        for pi in pis[k::concurrency]:
            status, _ = await senders[k].send(trigger.build("payment_intent.processing", pi))
            assert status == 200

    await asyncio.gather(*(create(k) for k in range(concurrency)))

    push_ms: list[float] = []
    ack_ms: list[float] = []
    lost = duplicated = 0

    async def one(sender: WebhookSender, pi: str) -> None:
        nonlocal lost, duplicated
        token = tokens.mint(server.token_secret, txn=[pi])[0]
        stream = await SSEStream.open(host, port, f"/v1/transactions/{pi}/events?token={token}")
        try:
            snap = await stream.next_event()
            assert snap is not None and snap.event == "snapshot" and snap.id == 1
            async def timed_read() -> tuple[object, float]:
                event = await stream.next_event()
                return event, time.perf_counter()  # stamped on arrival, not when looked at

            received = asyncio.ensure_future(timed_read())
            request = sender.prepare(trigger.build("payment_intent.succeeded", pi))
            t0 = time.perf_counter()
            status, answer = await sender.send(request)
            t_ack = time.perf_counter()
            assert status == 200 and answer["outcome"] == "applied", answer
            ev, t_push = await asyncio.wait_for(received, 10)
            if ev is None or ev.id != 2 or json.loads(ev.data)["status"] != "succeeded":
                lost += 1
                return
            push_ms.append((t_push - t0) * 1000)
            ack_ms.append((t_ack - t0) * 1000)
            if await asyncio.wait_for(stream.next_event(), 10) is not None:
                duplicated += 1  # anything after the final status would be a duplicate
        finally:
            stream.close()

    async def lane(k: int) -> None:
        for pi in pis[k::concurrency]:
            await one(senders[k], pi)

    started = time.perf_counter()
    await asyncio.gather(*(lane(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - started
    for s in senders:
        s.close()
    return {
        "events": events,
        "concurrency": concurrency,
        "webhook_sent_to_sse_received_ms": summary(push_ms),
        "webhook_ack_ms": summary(ack_ms),
        "lost": lost,
        "duplicated": duplicated,
        "no_loss_no_duplicates": lost == 0 and duplicated == 0 and len(push_ms) == events,
        "wall_seconds": round(elapsed, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--pg", choices=["system", "embedded"], default="system")
    parser.add_argument("--quick", action="store_true", help="100 events")
    args = parser.parse_args()
    events = 100 if args.quick else args.events

    database = FreshDatabase(args.pg)
    server = Server(database.url).start()
    try:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        result = asyncio.run(run(server, events, args.concurrency))
    finally:
        server.stop()
        database.drop()
    line = {"bench": "webhook_to_sse", "postgres": args.pg, **result, "machine": machine()}
    print(json.dumps(line))
    save(f"webhook_to_sse_{args.pg}_c{args.concurrency}", line)
    return 0 if result["no_loss_no_duplicates"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
