"""S6, scale-out on one machine: 3 nodes (each `paystream serve`, its own process, one
database) × N waiting SSE subscribers on distinct transactions, spread evenly, then
signed webhooks at a fixed rate sent round-robin to every node, each moving one
transaction to `succeeded`.  Webhooks go to a node chosen regardless of where the
subscriber waits, so about two pushes in three cross from one node to another through
Postgres NOTIFY.

Prints one JSON line, S1's measurements per node and for the fleet: webhook-ack and
webhook-sent → subscriber-received latency (p50/p90/p99/max, and split by same-node and
cross-node pushes), server RSS per idle connection on each node, server CPU while idle
and while pushing, database transactions per second while the subscribers wait, and
whether any event was lost or duplicated.  The client (every subscriber and webhook)
runs in this process, whose open-file limit is raised to its hard limit (20,000 here:
3 × 6,000 streams fit); the nodes, the client and Postgres share the machine's cores.

    .venv/bin/python bench/s6_scale_out.py [--nodes 3] [--subscribers-per-node 6000] [--rate 200] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import sys
import time
from pathlib import Path

import asyncpg
import psutil

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, and the root for tests.harness

from clients import WebhookSender, await_final_push, open_waiting, send_paced  # noqa: E402
from common import (  # noqa: E402
    STATS_LAG,
    bucket_delta,
    db_rate,
    fleet,
    longest,
    machine,
    open_all,
    raise_open_files,
    save,
    scrape,
    seed,
    summary,
)

from paystream.dev import trigger  # noqa: E402
from tests.harness import Server  # noqa: E402

LANES_PER_NODE = 8  # keep-alive webhook connections to each node
HANDOFF = "paystream_webhook_to_push_seconds_bucket{"
FULL_GC = 'paystream_gc_pause_seconds_bucket{generation="2",'


def cores(before: object, after: object, seconds: float) -> float:
    return ((after.user + after.system) - (before.user + before.system)) / seconds


def summed(scrapes_before: list[dict[str, float]], scrapes_after: list[dict[str, float]],
           prefix: str) -> dict[str, float]:
    """A histogram's bucket counts between two scrapes of every node, added up."""
    total: dict[str, float] = {}
    for before, after in zip(scrapes_before, scrapes_after, strict=True):
        for le, count in bucket_delta(before, after, prefix).items():
            total[le] = total.get(le, 0) + count
    return total


def counter(scrape_: dict[str, float], name: str) -> float:
    return scrape_.get(name, 0.0)


async def backend_pids(database_url: str) -> list[int]:
    """The Postgres backends serving this database (the nodes' pools and listeners)."""
    conn = await asyncpg.connect(database_url)
    try:
        return [r["pid"] for r in await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname ="
                                                   " current_database() AND pid <> pg_backend_pid()")]
    finally:
        await conn.close()


class MachineCpu:
    """Where the machine's CPU went over a window: the nodes, this client, the database's
    backends, and everything else (other work sharing the machine, Postgres's own
    background processes), with the hypervisor's steal besides."""

    def __init__(self, nodes: list[psutil.Process], backends: list[int]) -> None:
        self.nodes, self.me = nodes, psutil.Process()
        self.backends = []
        for pid in backends:
            try:
                self.backends.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass

    @staticmethod
    def _used(procs: list[psutil.Process]) -> float:
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def sample(self) -> tuple[float, ...]:
        m = psutil.cpu_times()
        return (time.perf_counter(), m.user + m.nice + m.system + m.irq + m.softirq, m.steal,
                self._used(self.nodes), self._used([self.me]), self._used(self.backends))

    @staticmethod
    def cores(a: tuple[float, ...], b: tuple[float, ...]) -> dict[str, float]:
        dt = b[0] - a[0]
        busy, steal, nodes, client, backends = ((y - x) / dt for x, y in zip(a[1:], b[1:], strict=True))
        return {"machine_busy": round(busy, 3), "nodes": round(nodes, 3), "client": round(client, 3),
                "postgres_backends": round(backends, 3),
                "rest_of_machine": round(max(busy - nodes - client - backends, 0), 3), "steal": round(steal, 3)}


async def postgres_version(database_url: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()


async def run(servers: list[Server], database_url: str, per_node: int, rate: float,
              idle_window: float) -> dict[str, object]:
    nodes = len(servers)
    procs = [psutil.Process(s.proc.pid) for s in servers]
    me = psutil.Process()
    n = per_node * nodes
    pis = await seed(database_url, n)
    home = {pi: i % nodes for i, pi in enumerate(pis)}  # the node each subscriber waits on
    rss_before = [p.memory_info().rss for p in procs]
    client_rss_before = me.memory_info().rss
    # What the fleet costs the database with nobody waiting (each node's listener health
    # check, the sweepers): subtracted below, so what is left is the subscribers' cost.
    await asyncio.sleep(STATS_LAG)
    before_qps = await db_rate(database_url, 5)

    # Open every subscriber on its node and read its snapshot.
    clients, open_seconds = await open_all(
        pis, lambda pi: open_waiting("127.0.0.1", servers[home[pi]].port, pi, servers[0].token_secret))
    gc.freeze()  # the client's own streams stay out of its collector (as in S1)
    # (Looked up now: this connection's own counters must land before the window opens.)
    watch = MachineCpu(procs, await backend_pids(database_url))
    # The opening's counters reach pg_stat_database.  With 18,000 opens on this VM most
    # landed 8-10 s after the last one and, under load, a share after STATS_LAG (counted
    # as 11 xact/s of "waiting"): so wait twice as long.
    await asyncio.sleep(2 * STATS_LAG)
    rss_open = [p.memory_info().rss for p in procs]
    client_rss_open = me.memory_info().rss

    # An idle window: what do N waiting browsers on each node cost?  A full run spans a
    # whole SSE ping interval (15 s), so every stream's keep-alive is counted.
    w0 = watch.sample()
    cpu0, t0 = [p.cpu_times() for p in procs], time.perf_counter()
    m0 = [await scrape(s.port) for s in servers]
    idle_qps = await db_rate(database_url, idle_window)
    cpu1, t1 = [p.cpu_times() for p in procs], time.perf_counter()
    w1 = watch.sample()
    m1 = [await scrape(s.port) for s in servers]
    idle_cpu = [cores(a, b, t1 - t0) for a, b in zip(cpu0, cpu1, strict=True)]

    # Receivers: each stamps its event on arrival.
    received: dict[str, float] = {}
    bad: list[str] = []

    async def receive(pi: str) -> None:
        received[pi], ok = await await_final_push(clients[pi])
        if not ok:
            bad.append(pi)

    receivers = [asyncio.create_task(receive(pi)) for pi in pis]

    # Webhooks at `rate` per second, the k-th to node k mod nodes, in an order unrelated
    # to where each transaction's subscriber waits.
    order = list(pis)
    random.Random(6).shuffle(order)
    target = {pi: k % nodes for k, pi in enumerate(order)}
    lanes = [[WebhookSender("127.0.0.1", s.port, s.webhook_secret) for _ in range(LANES_PER_NODE)] for s in servers]
    requests = {pi: lanes[0][0].prepare(trigger.build("payment_intent.succeeded", pi)) for pi in pis}
    await asyncio.gather(*(s.connect() for senders in lanes for s in senders))
    m2 = [await scrape(s.port) for s in servers]
    w2 = watch.sample()
    cpu2, me2, t2 = [p.cpu_times() for p in procs], me.cpu_times(), time.perf_counter()
    sent, acks = await send_paced(lanes, order, requests, rate)
    send_seconds = time.perf_counter() - t2
    done, _ = await asyncio.wait(receivers, timeout=120)
    cpu3, me3, t3 = [p.cpu_times() for p in procs], me.cpu_times(), time.perf_counter()
    w3 = watch.sample()
    m3 = [await scrape(s.port) for s in servers]
    for task in receivers:
        task.cancel()
    for senders in lanes:
        for s in senders:
            s.close()
    for c in clients.values():
        c.close()

    def push_ms(keep: object) -> list[float]:
        return [(received[pi] - sent[pi]) * 1000 for pi in pis if pi in received and pi in sent and keep(pi)]

    push = push_ms(lambda pi: True)
    handed = summed(m2, m3, HANDOFF)
    total = handed.get("+Inf", 0) or 1
    pushed = [counter(b, "paystream_events_pushed_total") - counter(a, "paystream_events_pushed_total")
              for a, b in zip(m2, m3, strict=True)]
    return {
        "nodes": nodes, "subscribers_per_node": per_node, "subscribers": n, "transport": "sse",
        "webhook_rate_per_s": rate, "webhook_routing": "round-robin over the nodes",
        "achieved_webhook_rate_per_s": round(len(sent) / send_seconds, 1),
        "cross_node_pushes": sum(target[pi] != home[pi] for pi in pis),
        "open_seconds": round(open_seconds, 2),
        "webhook_ack_ms": summary(acks),
        "webhook_sent_to_subscriber_received_ms": summary(push),
        "same_node_ms": summary(push_ms(lambda pi: target[pi] == home[pi])),
        "cross_node_ms": summary(push_ms(lambda pi: target[pi] != home[pi])),
        # The nodes' own view (paystream_webhook_to_push_seconds, all nodes together): the
        # share of changes handed to their subscribers within 5 and 25 ms of being written.
        "server_write_to_handoff_share": {"le_5ms": round(handed.get("0.005", 0) / total, 4),
                                          "le_25ms": round(handed.get("0.025", 0) / total, 4)},
        "events_pushed_by_node": [int(p) for p in pushed],
        "server_rss_mb": {"before": [round(r / 2**20, 1) for r in rss_before],
                          "with_subscribers": [round(r / 2**20, 1) for r in rss_open]},
        "server_rss_kb_per_idle_connection": {
            "per_node": [round((b - a) / per_node / 1024, 2) for a, b in zip(rss_before, rss_open, strict=True)],
            "mean": round((sum(rss_open) - sum(rss_before)) / n / 1024, 2)},
        "server_cpu_idle_cores": {"per_node": [round(c, 3) for c in idle_cpu], "total": round(sum(idle_cpu), 3)},
        "idle_window_seconds": idle_window,
        "server_cpu_while_pushing_cores": {
            "per_node": [round(cores(a, b, t3 - t2), 3) for a, b in zip(cpu2, cpu3, strict=True)],
            "total": round(sum(cores(a, b, t3 - t2) for a, b in zip(cpu2, cpu3, strict=True)), 3)},
        "client_cpu_while_pushing_cores": round(cores(me2, me3, t3 - t2), 3),
        # Machine-wide, in cores: whatever "rest_of_machine" holds competed with the run.
        "machine_cpu_cores": {"idle_window": MachineCpu.cores(w0, w1), "pushing": MachineCpu.cores(w2, w3)},
        "client_rss_kb_per_connection": round((client_rss_open - client_rss_before) / n / 1024, 2),
        # Transactions/s in the database while N subscribers waited on each node, and the
        # same less what the fleet cost with none waiting (db_queries_per_s_while_waiting).
        "db_xacts_per_s_before_subscribers": round(before_qps, 2),
        "db_xacts_per_s_while_waiting": round(idle_qps, 2),
        "db_queries_per_s_while_waiting": round(max(idle_qps - before_qps, 0), 2),
        "full_gc": {"idle": {"count": summed(m0, m1, FULL_GC).get("+Inf", 0),
                             "longest": longest(summed(m0, m1, FULL_GC))},
                    "pushing": {"count": summed(m2, m3, FULL_GC).get("+Inf", 0),
                                "longest": longest(summed(m2, m3, FULL_GC))}},
        "lost": n - len(received), "wrong_or_duplicated": len(bad),
        "no_loss_no_duplicates": len(received) == n and not bad and len(done) == n,
        "samples_ms": push,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--subscribers-per-node", type=int, default=6000)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--pg", choices=["system", "embedded"], default="system")
    parser.add_argument("--quick", action="store_true", help="500 subscribers per node")
    args = parser.parse_args()
    per_node = 500 if args.quick else args.subscribers_per_node
    open_files = raise_open_files()
    need = per_node * args.nodes + args.nodes * LANES_PER_NODE + 100
    if need > open_files:
        print(f"{per_node * args.nodes} streams need about {need} open files; this process may open {open_files}",
              file=sys.stderr)
        return 2
    # The servers as shipped; only the per-address limit one test client trips is raised.
    with fleet(args.nodes, clients=per_node, pg=args.pg) as (servers, database):
        pg_version = asyncio.run(postgres_version(database.url))
        result = asyncio.run(run(servers, database.url, per_node, args.rate, 5 if args.quick else 16))
    samples = result.pop("samples_ms")
    memory_gib = round(psutil.virtual_memory().total / 2**30, 1)
    line = {"bench": "s6_scale_out", **result, "client_open_file_limit": open_files,
            "machine": {**machine(), "memory_gib": memory_gib, "postgres": pg_version,
                        "shared": f"the client, {args.nodes} nodes and Postgres on the same {psutil.cpu_count()} cores"}}
    print(json.dumps(line))
    save("s6_scale_out", line, samples)
    return 0 if result["no_loss_no_duplicates"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
