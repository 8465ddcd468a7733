"""S3, webhook storm: the highest sustained rate of verified webhooks with zero errors,
for 1 and 2 server workers, next to the raw Postgres ceiling for the same transaction
shape (update + event insert + NOTIFY, no HTTP) measured in the same run.

Each step sends signed `payment_intent.succeeded` events for seeded `processing`
transactions at a fixed open-loop rate for a few seconds; a step is sustained when every
answer is 200, the achieved rate is within 5% of the target and ack p99 stays under 1 s.
The ladder climbs until a step is not sustained, then bisects between the last sustained
rate and that one (3 more steps; 2 with --quick).

    .venv/bin/python bench/s3_storm.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import asyncpg

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, and the root for tests.harness

from clients import WebhookSender  # noqa: E402
from common import machine, save, summary  # noqa: E402

from paystream.changes import store, transitions  # noqa: E402
from paystream.changes.lifecycle import Change, stripe_now  # noqa: E402
from paystream.dev import trigger  # noqa: E402
from tests.harness import FreshDatabase, Server  # noqa: E402


async def seed(database_url: str, n: int) -> list[str]:
    """n `processing` transactions with their first log row, in one statement each."""
    conn = await asyncpg.connect(database_url)
    prefix = trigger.stripe_id("pi_")[:13]  # pi_ and a random tag of 10
    await conn.execute(
        """INSERT INTO transactions (id, stripe_id, kind, status, amount, currency, seq)
           SELECT 'txn_' || substr($1, 4) || lpad(to_hex(g), 16, '0'), $1 || g, 'payment', 'processing',
                  1500, 'usd', 1
             FROM generate_series($2::int, $3::int) g""", prefix, 1, n)
    await conn.execute(
        """INSERT INTO transaction_events (transaction_id, seq, status, data)
           SELECT id, 1, status, json_build_object('id', id, 'status', status, 'seq', 1)
             FROM transactions WHERE stripe_id LIKE $1 || '%'""", prefix)
    await conn.close()
    return [f"{prefix}{g}" for g in range(1, n + 1)]


async def raw_ceiling(database_url: str, writers: int, seconds: float, listen: bool = True) -> float:
    """Commits/s of update + event insert + NOTIFY, from `writers` connections, with one
    connection LISTENing as paystream's hub does (a NOTIFY that reaches no listener costs
    Postgres less; the issue's own baseline was measured commit -> listener)."""
    ids = await seed(database_url, int(5000 * seconds))  # more than any writer count gets through
    conns = [await asyncpg.connect(database_url) for _ in range(writers)]
    for c in conns:
        await store.init_connection(c)
    listener = await asyncpg.connect(database_url)
    if listen:
        await listener.add_listener(store.CHANNEL, lambda *_: None)
    done = 0
    stop_at = time.perf_counter() + seconds
    succeeded = Change("succeeded", stripe_now())

    async def writer(k: int, conn: asyncpg.Connection) -> None:
        nonlocal done
        mine = ids[k::writers]  # disjoint rows: writers never wait on each other's row locks
        i = 0
        while time.perf_counter() < stop_at and i < len(mine):
            # The statements the server runs for the same move (lock; update + log +
            # NOTIFY as one), minus storing the raw Stripe event.
            async with conn.transaction():
                row = await store.lock_by_stripe_id(conn, mine[i])
                await store.move_and_log(conn, transitions.next_row(row, succeeded), previous_status="processing",
                                         stripe_event_id=None, event_type="bench")
            done += 1
            i += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(writer(k, c) for k, c in enumerate(conns)))
    elapsed = time.perf_counter() - t0
    for c in conns:
        await c.close()
    await listener.close()
    return done / elapsed


async def step(server: Server, pis: list[str], rate: float, seconds: float, lanes: int) -> dict[str, object]:
    n = int(rate * seconds)
    batch = pis[:n]
    del pis[:n]  # each step moves fresh transactions
    senders = [WebhookSender("127.0.0.1", server.port, server.webhook_secret) for _ in range(lanes)]
    requests = [senders[0].prepare(trigger.build("payment_intent.succeeded", pi)) for pi in batch]
    await asyncio.gather(*(s.connect() for s in senders))
    acks: list[float] = []
    errors = 0
    t0 = time.perf_counter()

    async def lane(k: int) -> None:
        nonlocal errors
        for i in range(k, n, lanes):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # open-loop pacing
            start = time.perf_counter()
            try:
                status, _ = await senders[k].send(requests[i])
            except (OSError, asyncio.IncompleteReadError):
                status = 0
            acks.append((time.perf_counter() - start) * 1000)
            errors += status != 200

    await asyncio.gather(*(lane(k) for k in range(lanes)))
    elapsed = time.perf_counter() - t0
    for s in senders:
        s.close()
    achieved = n / elapsed
    ack = summary(acks)
    return {"target_per_s": rate, "achieved_per_s": round(achieved, 1), "errors": errors, "ack_ms": ack,
            "sustained": errors == 0 and achieved >= 0.95 * rate and ack.get("p99", 1e9) < 1000}


async def storm(server: Server, database_url: str, rates: list[float], seconds: float,
                refine: int) -> list[dict[str, object]]:
    """Climb the ladder until a step is not sustained, then bisect `refine` times between
    the last sustained rate and that one: the ladder alone is 20% coarse at the top."""
    pis = await seed(database_url, int((sum(rates) + refine * max(rates)) * seconds) + 1000)
    steps = []
    lo, hi = 0.0, None
    for rate in rates:
        result = await step(server, pis, rate, seconds, lanes=lanes_for(rate))
        steps.append(result)
        if not result["sustained"]:
            hi = rate
            break
        lo = rate
    for _ in range(refine if hi is not None and lo else 0):
        rate = round((lo + hi) / 2)
        result = await step(server, pis, rate, seconds, lanes=lanes_for(rate))
        steps.append(result)
        lo, hi = (rate, hi) if result["sustained"] else (lo, rate)
    return steps


def lanes_for(rate: float) -> int:
    return min(128, max(8, int(rate / 10)))  # keep-alive connections, as Stripe opens several


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s steps, coarser rates, 1 and 8 raw writers (under a minute)")
    args = parser.parse_args()
    seconds = 2.0 if args.quick else 6.0
    rates = [200, 600, 1000, 1200, 1400, 1600] if args.quick else [100, 200, 300, 400, 500, 600, 800, 1000, 1200,
                                                                    1400, 1600, 1800, 2000]
    writer_counts = (1, 8) if args.quick else (1, 8, 32)
    import uvloop

    uvloop.install()
    lines = []
    database = FreshDatabase("system")
    try:
        ceiling = {w: round(asyncio.run(raw_ceiling(database.url, w, seconds)), 1) for w in writer_counts}
        for workers in (1, 2):
            server = Server(database.url, {"PAYSTREAM_DB_POOL": "20"}, args=("--workers", str(workers))).start()
            try:
                steps = asyncio.run(storm(server, database.url, rates, seconds, refine=2 if args.quick else 3))
            finally:
                server.stop()
            best = max((s["achieved_per_s"] for s in steps if s["sustained"]), default=0.0)
            lines.append({"bench": "s3_storm", "workers": workers, "step_seconds": seconds,
                          "sustained_webhooks_per_s": best,
                          "raw_postgres_commits_per_s": ceiling, "share_of_raw_ceiling": round(best / max(ceiling.values()), 2),
                          "steps": steps, "machine": machine()})
    finally:
        database.drop()
    for line in lines:
        print(json.dumps(line))
        save(f"s3_storm_{line['workers']}w", line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
