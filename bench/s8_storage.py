"""S8, storage: the write path on an empty database and on databases pre-grown to N Stripe
events, in one run, and what those events cost on disk.

For each size (default: 0 and 1,000,000 events):
- a fresh migrated database is pre-grown with SQL only (generate_series, in batches;
  progress on stderr): N stripe_events whose raw bodies are real Stripe payloads
  (tests/fixtures/stripe/payment_intent.{processing,succeeded}, pretty-printed as Stripe
  sends them) with distinct ids and times spread over N / --events-per-day days, and what
  those events made in the other tables, as a paystream that has served them holds it:
  one `succeeded` payment per 2 events (transactions), its 2 log rows (transaction_events,
  with the pushed JSON), 2 delivered signed webhooks (outbound_deliveries), the
  Idempotency-Key of its POST /v1/transactions (idempotency_keys) and its balanced capture
  group (2 ledger_entries).  The load runs with `session_replication_role = replica`, which
  skips the schema's triggers (the log's seq guard, the ledger's deferred balance check)
  and foreign-key checks, row by row far too slow for millions of rows; the rows are made
  consistent by construction and checked afterwards (seq matches the log, every ledger
  group balances, every delivery has its log row).  Then VACUUM ANALYZE, as autovacuum
  would have left an old database;
- disk: pg_relation_size (heap), TOAST, pg_indexes_size and pg_total_relation_size of each
  table and pg_relation_size of each index, and per million events;
- `paystream serve` (1 worker) on it: signed payment_intent.processing then .succeeded
  webhooks for new PaymentIntents, their bodies the same real payloads (each pair in order
  on one keep-alive connection), first at a steady --rate for --seconds (ack p50/p99), then
  a ladder of rates, --step-seconds each, until a step has an error, falls 5% short of its
  rate, or its ack p99 passes --p99-bound-ms, then --refine bisecting steps: the highest
  clean step is the sustained zero-error rate;
- autovacuum while the server ran: pg_stat_user_tables before and after (dead tuples,
  autovacuum and autoanalyze counts, last_autovacuum) and pg_stat_progress_vacuum sampled
  every 0.5 s.

Then (--retention-minutes, default 5; 0 skips) retention measured in minutes: a fresh
database, `paystream serve` with PAYSTREAM_RETAIN_STRIPE_EVENTS=--retention-keep (60 s) and
partitions of --retention-partition (15 s), webhooks at --rate for that long, disk sampled
every --retention-sample seconds: stripe_events should stop growing once its first
partitions pass retention, while the log and the ledger (never pruned) grow with payments.

Pre-grown events go into stripe_events' partitions (a day each, as a server makes them) over
their whole span: --events-per-day 28000 spreads a million over 35 days, the partitions a
production database holds at the default retention.

The system Postgres of the test machines runs with autovacuum off (the JSON line records
the settings); --pg embedded gives each size a Postgres of its own with the defaults.

Prints one JSON line and writes bench/results/s8_storage.json (--pg embedded:
s8_storage_embedded.json).

    .venv/bin/python bench/s8_storage.py [--quick] [--sizes 0,1000000,5000000] [--pg embedded]
                                         [--events-per-day 28000] [--retention-minutes 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path

import asyncpg

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, and the root for tests.harness

from clients import WebhookSender  # noqa: E402
from common import machine, save, summary  # noqa: E402

from paystream.dev import trigger  # noqa: E402
from paystream.ops.retention import Retention, ensure_partitions  # noqa: E402
from tests.harness import FreshDatabase, Server  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "stripe"
BULK_LOAD_NOTE = ("pre-grown with session_replication_role = replica (the schema's triggers and foreign-key "
                  "checks skipped for the bulk load; rows consistent by construction and checked after it)")


def log(message: str) -> None:
    print(f"[s8 {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def body_template(event_type: str) -> tuple[str, str]:
    """A real Stripe payload of `event_type` as Stripe sends it, its ids and times made
    placeholders ({EVT}, {PI}, {CH}, {CREATED}), and its API version.  Both templates'
    PaymentIntent is 2000 usd (the processing fixture's 900 eur is made so), so that one
    payment's two events agree."""
    path = FIXTURES / f"{event_type}__stripe-ruby-mock.json"
    text = path.read_text()
    event = json.loads(text)
    obj = event["data"]["object"]
    charge = obj["charges"]["data"][0]["id"] if obj.get("charges", {}).get("data") else None
    text = text.replace(f'"{event["id"]}"', '"{EVT}"').replace(f'"{obj["id"]}"', '"{PI}"')
    if charge:
        text = text.replace(f'"{charge}"', '"{CH}"')
    for created in {event["created"], obj.get("created")} - {None}:
        text = text.replace(f'"created": {created}', '"created": {CREATED}')
    text = text.replace('"amount": 900,', '"amount": 2000,').replace('"currency": "eur"', '"currency": "usd"')
    return text, event["api_version"]


TEMPLATES = {t: body_template(t)[0] for t in ("payment_intent.processing", "payment_intent.succeeded")}


def real_body(event_type: str, pi: str) -> bytes:
    """A webhook body at Stripe's real size for a new event about `pi`."""
    return (TEMPLATES[event_type].replace("{EVT}", trigger.stripe_id("evt_")).replace("{PI}", pi)
            .replace("{CH}", trigger.stripe_id("ch_")).replace("{CREATED}", str(int(time.time())))).encode()


def signed(body: bytes, secret: str) -> tuple[str, bytes]:
    """The request as WebhookSender.prepare makes it, for a body kept byte for byte."""
    return (f"POST /v1/stripe/webhook HTTP/1.1\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Stripe-Signature: {trigger.sign(body, secret)}\r\nContent-Length: {len(body)}\r\n", body)


# One row per pre-grown payment g of n: its ids and the time of its first event, spread
# evenly over the last $4 seconds.  Stripe ids are md5-random, as Stripe's are random
# (so their indexes fill as a real one does); transaction ids grow with time, as ULIDs do.
_PAYMENTS = """SELECT g, 'txn_S8' || lpad(g::text, 24, '0') AS id, 'pi_' || substr(md5('pi' || g), 1, 24) AS pi,
                      'ch_' || substr(md5('ch' || g), 1, 24) AS ch, 'cus_' || substr(md5('cus' || (g % 100000)), 1, 14) AS cus,
                      now() - make_interval(secs => $4::float8 * (1 - g::float8 / $3::float8)) AS t
                 FROM generate_series($1::int, $2::int) g"""
# Its two events: processing at t, succeeded 3 s later.
_EVENTS = """SELECT p.*, e.seq, e.type, e.prev, e.status, t + (e.seq - 1) * interval '3 s' AS et,
                    'evt_' || substr(md5('evt' || p.g || ':' || e.seq), 1, 24) AS evt
               FROM (""" + _PAYMENTS + """) p
              CROSS JOIN (VALUES (1, 'payment_intent.processing', NULL, 'processing'),
                                 (2, 'payment_intent.succeeded', 'processing', 'succeeded')) e (seq, type, prev, status)"""

GROW = [
    ("transactions", """
     INSERT INTO transactions (id, stripe_id, kind, status, amount, currency, customer_id, metadata, seq,
                               status_at, created_at, updated_at)
     SELECT id, pi, 'payment', 'succeeded', 2000, 'usd', cus, jsonb_build_object('order_id', 'ord_' || g), 2,
            t + interval '3 s', t - interval '20 s', t + interval '3.2 s'
       FROM (""" + _PAYMENTS + ") p"),
    ("stripe_events", """
     INSERT INTO stripe_events (id, type, object_id, api_version, livemode, created, raw_body, headers,
                                received_at, processed_at, transaction_id, outcome, attempts)
     SELECT evt, type, pi, CASE seq WHEN 1 THEN $7 ELSE $8 END, false, et, raw,
            jsonb_build_object('content-type', 'application/json; charset=utf-8',
                               'user-agent', 'Stripe/1.0 (+https://stripe.com/docs/webhooks)',
                               'content-length', octet_length(raw)::text,
                               'stripe-signature', 't=' || extract(epoch FROM et)::bigint || ',v1=' || md5(evt) || md5(evt || 'v1')),
            et + interval '0.2 s', et + interval '0.205 s', id, 'applied', 1
       FROM (SELECT x.*, replace(replace(replace(replace(CASE seq WHEN 1 THEN $5 ELSE $6 END,
                                 '{EVT}', evt), '{PI}', pi), '{CH}', ch), '{CREATED}', extract(epoch FROM et)::bigint::text) AS raw
               FROM (""" + _EVENTS + ") x) y"),
    ("transaction_events", """
     INSERT INTO transaction_events (transaction_id, seq, status, previous_status, stripe_event_id, event_type,
                                     data, created_at)
     SELECT id, seq, status, prev, evt, type,
            json_build_object('id', id, 'stripe_id', pi, 'kind', 'payment', 'status', status, 'amount', 2000,
                              'currency', 'usd', 'customer_id', cus, 'metadata', json_build_object('order_id', 'ord_' || g),
                              'last_error', NULL, 'validated', false, 'amount_refunded', 0, 'dispute', NULL,
                              'refunds', json_build_array(), 'seq', seq,
                              'updated_at', to_char(et AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                              'authorization_expires_at', NULL, 'previous_status', prev,
                              'cause', json_build_object('stripe_event_id', evt, 'type', type)),
            et + interval '0.203 s'
       FROM (""" + _EVENTS + ") x"),
    ("outbound_deliveries", """
     INSERT INTO outbound_deliveries (webhook_id, transaction_id, seq, attempts, next_attempt_at, queued_at,
                                      last_attempt_at, delivered_at, last_status, created_at)
     SELECT 'msg_' || substr(id, 5) || '_' || seq, id, seq, 1, NULL, et + interval '0.203 s',
            et + interval '0.25 s', et + interval '0.3 s', 200, et + interval '0.203 s'
       FROM (""" + _EVENTS + ") x"),
    ("idempotency_keys", """
     INSERT INTO idempotency_keys (key, request_hash, transaction_id, status_code, response, created_at)
     SELECT regexp_replace(md5('key' || g), '(.{8})(.{4})(.{4})(.{4})(.{12})', '\\1-\\2-\\3-\\4-\\5'),
            md5('req' || g) || md5('hash' || g), id, 201,
            jsonb_build_object('id', id, 'stripe_id', pi, 'kind', 'payment', 'status', 'requires_payment_method',
                               'amount', 2000, 'currency', 'usd', 'customer_id', cus,
                               'metadata', jsonb_build_object('order_id', 'ord_' || g), 'last_error', NULL,
                               'validated', false, 'amount_refunded', 0, 'dispute', NULL, 'refunds', jsonb_build_array(),
                               'seq', 0, 'updated_at', to_char((t - interval '20 s') AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                               'authorization_expires_at', NULL, 'client_secret', pi || '_secret_' || substr(md5('cs' || g), 1, 25)),
            t - interval '20 s'
       FROM (""" + _PAYMENTS + ") p"),
    ("ledger_entries", """
     INSERT INTO ledger_entries (entry_group, transaction_id, account, amount, currency, created_at)
     SELECT 'capture:' || id, id, l.account, l.amount, 'usd', t + interval '3.2 s'
       FROM (""" + _PAYMENTS + """) p
      CROSS JOIN (VALUES ('stripe:clearing', -2000), ('merchant:revenue', 2000)) l (account, amount)"""),
]

CHECKS = {
    # Every transaction's seq is its log's length and its last row's seq (the seq guard's rule).
    "seq_mismatches": """SELECT count(*) FROM transactions t
                          LEFT JOIN (SELECT transaction_id, count(*) n, max(seq) m FROM transaction_events GROUP BY 1) e
                            ON e.transaction_id = t.id
                         WHERE coalesce(e.n, 0) <> t.seq OR coalesce(e.m, 0) <> t.seq""",
    "unbalanced_ledger_groups": """SELECT count(*) FROM (SELECT 1 FROM ledger_entries GROUP BY entry_group, currency
                                                      HAVING sum(amount) <> 0) u""",
    "deliveries_without_log_row": """SELECT count(*) FROM outbound_deliveries d WHERE NOT EXISTS
                                      (SELECT FROM transaction_events e WHERE e.transaction_id = d.transaction_id
                                                                          AND e.seq = d.seq)""",
    "events_without_transaction": """SELECT count(*) FROM stripe_events s WHERE s.transaction_id IS NOT NULL AND NOT EXISTS
                                      (SELECT FROM transactions t WHERE t.id = s.transaction_id)""",
}


async def grow(url: str, events: int, events_per_day: int, batch: int) -> dict[str, object]:
    """Pre-grow the database to `events` Stripe events (and their payments' rows)."""
    payments = events // 2
    span = max(60.0, events / events_per_day * 86400)
    (proc, proc_api), (succ, succ_api) = body_template("payment_intent.processing"), body_template("payment_intent.succeeded")
    # stripe_events' partitions for the whole span, as a server running all along made them
    # (PAYSTREAM_PARTITION_INTERVAL's default: a day each).
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    try:
        made = await ensure_partitions(pool, Retention(), since=await pool.fetchval("SELECT now()")
                                       - timedelta(seconds=span + 3600))
    finally:
        await pool.close()
    log(f"{len(made)} partitions of stripe_events for {span / 86400:.1f} days")
    conn = await asyncpg.connect(url, command_timeout=None)
    t0 = time.perf_counter()
    try:
        await conn.execute("SET session_replication_role = replica; SET synchronous_commit = off;"
                           " SET maintenance_work_mem = '256MB'")
        for lo in range(1, payments + 1, batch):
            hi = min(payments, lo + batch - 1)
            async with conn.transaction():
                for table, sql in GROW:
                    args = [lo, hi, float(payments), span]
                    if table == "stripe_events":
                        args += [proc, succ, proc_api, succ_api]
                    await conn.execute(sql, *args)
            done = hi * 2
            rate = done / (time.perf_counter() - t0)
            log(f"grown {done:,}/{events:,} events ({rate:,.0f}/s, ~{(events - done) / rate:,.0f} s left)")
        await conn.execute("RESET session_replication_role")
        grown_s = time.perf_counter() - t0
        checks = {name: await conn.fetchval(sql) for name, sql in CHECKS.items()} if payments else {}
        log(f"checks: {checks}; VACUUM ANALYZE")
        t1 = time.perf_counter()
        await conn.execute("VACUUM (ANALYZE)")
        try:
            await conn.execute("CHECKPOINT")  # the load's WAL written out before anything is measured
        except asyncpg.InsufficientPrivilegeError:
            pass
        vacuum_s = time.perf_counter() - t1
    finally:
        await conn.close()
    bad = {k: v for k, v in checks.items() if v}
    if bad:
        raise RuntimeError(f"pre-grown rows break the schema's rules: {bad}")
    return {"events": payments * 2, "payments": payments, "days_spread": round(span / 86400, 2),
            "stripe_events_partitions": len(made),
            "seconds": round(grown_s, 1), "vacuum_analyze_seconds": round(vacuum_s, 1), "checks": checks,
            "bulk_load": BULK_LOAD_NOTE if payments else None}


async def disk(url: str, events: int) -> dict[str, object]:
    """Bytes of every table (heap, TOAST, indexes, total) and index, and per million events."""
    conn = await asyncpg.connect(url)
    try:
        # A partitioned table (stripe_events) is counted as one: its partitions summed.
        tables = await conn.fetch(
            """SELECT coalesce(p.relname, c.relname) AS relname, sum(greatest(c.reltuples, 0))::bigint AS rows,
                      count(*) AS partitions, sum(pg_relation_size(c.oid))::bigint AS heap,
                      sum(coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0))::bigint AS toast,
                      sum(pg_indexes_size(c.oid))::bigint AS indexes, sum(pg_total_relation_size(c.oid))::bigint AS total
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 LEFT JOIN pg_inherits h ON h.inhrelid = c.oid LEFT JOIN pg_class p ON p.oid = h.inhparent
                WHERE n.nspname = 'public' AND c.relkind = 'r' GROUP BY 1 ORDER BY total DESC""")
        indexes = await conn.fetch(
            """SELECT coalesce(h.inhparent::regclass::text, i.indexrelid::regclass::text) AS name,
                      coalesce(p.relname, c.relname) AS table_name, sum(pg_relation_size(i.indexrelid))::bigint AS bytes
                 FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                 LEFT JOIN pg_inherits h ON h.inhrelid = i.indexrelid
                 LEFT JOIN pg_inherits ht ON ht.inhrelid = c.oid LEFT JOIN pg_class p ON p.oid = ht.inhparent
                WHERE n.nspname = 'public' GROUP BY 1, 2 ORDER BY bytes DESC""")
        database = await conn.fetchval("SELECT pg_database_size(current_database())")
    finally:
        await conn.close()
    per = (1e6 / events) if events else None

    def scaled(b: int) -> int | None:
        return None if per is None else round(b * per)

    return {
        "events": events, "database_bytes": database, "database_bytes_per_million_events": scaled(database),
        "tables": {r["relname"]: {"rows": max(r["rows"], 0), "partitions": r["partitions"], "heap": r["heap"],
                                  "toast": r["toast"],
                                  "indexes": r["indexes"], "total": r["total"],
                                  "total_per_million_events": scaled(r["total"])} for r in tables},
        "indexes": {r["name"]: {"table": r["table_name"], "bytes": r["bytes"], "per_million_events": scaled(r["bytes"])}
                    for r in indexes},
    }


_TABLE_STATS = """SELECT relname, n_live_tup, n_dead_tup, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del,
                         autovacuum_count, autoanalyze_count, vacuum_count, last_autovacuum, last_autoanalyze
                    FROM pg_stat_user_tables WHERE schemaname = 'public'"""


async def table_stats(url: str) -> dict[str, dict[str, object]]:
    conn = await asyncpg.connect(url)
    try:
        return {r["relname"]: dict(r) for r in await conn.fetch(_TABLE_STATS)}
    finally:
        await conn.close()


def vacuum_work(before: dict[str, dict[str, object]], after: dict[str, dict[str, object]],
                progress: dict[str, dict[str, object]]) -> dict[str, object]:
    """What autovacuum did to each table that changed while the server ran."""
    out = {}
    for name, a in after.items():
        b = before.get(name, {})
        delta = {k: a[k] - (b.get(k) or 0) for k in ("n_tup_ins", "n_tup_upd", "n_tup_hot_upd", "n_tup_del",
                                                     "autovacuum_count", "autoanalyze_count")}
        if not any(delta.values()) and name not in progress:
            continue
        out[name] = {"inserted": delta["n_tup_ins"], "updated": delta["n_tup_upd"], "hot_updated": delta["n_tup_hot_upd"],
                     "deleted": delta["n_tup_del"], "dead_tuples_before": b.get("n_dead_tup"),
                     "dead_tuples_after": a["n_dead_tup"], "autovacuums": delta["autovacuum_count"],
                     "autoanalyzes": delta["autoanalyze_count"],
                     "last_autovacuum": a["last_autovacuum"].isoformat() if a["last_autovacuum"] else None,
                     "vacuum_progress": progress.get(name)}
    return out


async def sample_vacuum(url: str, stop: asyncio.Event, every: float = 0.5) -> dict[str, dict[str, object]]:
    """pg_stat_progress_vacuum of this database, sampled until `stop`: per table, how many
    samples saw a vacuum on it, the phases seen, its size in blocks and the most scanned."""
    conn = await asyncpg.connect(url)
    seen: dict[str, dict[str, object]] = {}
    try:
        while not stop.is_set():
            for r in await conn.fetch(
                    """SELECT p.relid::regclass::text AS rel, p.phase, p.heap_blks_total, p.heap_blks_scanned,
                              p.index_vacuum_count, a.query
                         FROM pg_stat_progress_vacuum p LEFT JOIN pg_stat_activity a USING (pid)
                        WHERE p.datname = current_database()"""):
                s = seen.setdefault(r["rel"], {"samples": 0, "phases": [], "heap_blks_total": 0,
                                               "max_heap_blks_scanned": 0, "max_index_vacuum_count": 0,
                                               "by": "autovacuum" if (r["query"] or "").startswith("autovacuum") else "vacuum"})
                s["samples"] += 1
                if r["phase"] not in s["phases"]:
                    s["phases"].append(r["phase"])
                s["heap_blks_total"] = max(s["heap_blks_total"], r["heap_blks_total"] or 0)
                s["max_heap_blks_scanned"] = max(s["max_heap_blks_scanned"], r["heap_blks_scanned"] or 0)
                s["max_index_vacuum_count"] = max(s["max_index_vacuum_count"], r["index_vacuum_count"] or 0)
            try:
                await asyncio.wait_for(stop.wait(), every)
            except TimeoutError:
                pass
    finally:
        await conn.close()
    for s in seen.values():
        s["seconds_seen"] = round(s["samples"] * every, 1)
    return seen


def lanes_for(rate: float) -> int:
    return min(128, max(8, int(rate / 10)))  # keep-alive connections, as Stripe opens several


async def step(server: Server, rate: float, seconds: float) -> dict[str, object]:
    """`rate` webhooks/s for `seconds`, open-loop: processing then succeeded for rate/2 new
    PaymentIntents a second, both of one PaymentIntent in order on one connection."""
    pairs = max(1, int(rate * seconds / 2))
    lanes = lanes_for(rate)
    senders = [WebhookSender("127.0.0.1", server.port, server.webhook_secret) for _ in range(lanes)]
    requests = []
    for _ in range(pairs):  # signed before the clock starts
        pi = trigger.stripe_id("pi_")
        requests += [signed(real_body("payment_intent.processing", pi), server.webhook_secret),
                     signed(real_body("payment_intent.succeeded", pi), server.webhook_secret)]
    await asyncio.gather(*(s.connect() for s in senders))
    acks: list[float] = []
    errors = not_applied = 0
    t0 = time.perf_counter()

    async def lane(k: int) -> None:
        nonlocal errors, not_applied
        sender = senders[k]
        for p in range(k, pairs, lanes):
            for i in (2 * p, 2 * p + 1):
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)  # open-loop pacing, not synchronisation
                start = time.perf_counter()
                try:
                    status, answer = await sender.send(requests[i])
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    status, answer = 0, {}
                    sender.close()
                    sender._conn = None  # the next request opens a new connection
                acks.append((time.perf_counter() - start) * 1000)
                errors += status != 200
                not_applied += status == 200 and answer.get("outcome") != "applied"

    await asyncio.gather(*(lane(k) for k in range(lanes)))
    elapsed = time.perf_counter() - t0
    for s in senders:
        s.close()
    return {"target_per_s": rate, "seconds": seconds, "webhooks": len(requests),
            "achieved_per_s": round(len(requests) / elapsed, 1), "errors": errors, "not_applied": not_applied,
            "ack_ms": summary(acks)}


def clean(result: dict[str, object], p99_bound_ms: float) -> bool:
    return (result["errors"] == 0 and result["achieved_per_s"] >= 0.95 * result["target_per_s"]
            and result["ack_ms"].get("p99", 1e9) < p99_bound_ms)


async def ladder_step(server: Server, rate: float, args: argparse.Namespace) -> dict[str, object]:
    log(f"ladder: {rate:g} webhooks/s for {args.step_seconds:g} s")
    result = await step(server, rate, args.step_seconds)
    result["clean"] = clean(result, args.p99_bound_ms)
    result["load_average_after"] = round(os.getloadavg()[0], 2)
    return result


async def load(server: Server, url: str, args: argparse.Namespace) -> dict[str, object]:
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample_vacuum(url, stop))
    try:
        log(f"steady: {args.rate:g} webhooks/s for {args.seconds:g} s")
        steady = await step(server, args.rate, args.seconds)
        steady["clean"] = clean(steady, args.p99_bound_ms)
        ladder, lo, hi = [], 0.0, None
        for rate in args.rates:
            result = await ladder_step(server, rate, args)
            ladder.append(result)
            if not result["clean"]:
                hi = rate
                break
            lo = rate
        # The ladder is coarse at the top: bisect between the last clean rate and the first not.
        for _ in range(args.refine if hi is not None and lo else 0):
            rate = round((lo + hi) / 2)
            result = await ladder_step(server, rate, args)
            ladder.append(result)
            lo, hi = (rate, hi) if result["clean"] else (lo, rate)
        best = max((s["achieved_per_s"] for s in ladder if s["clean"]), default=0.0)
    finally:
        stop.set()
        progress = await sampler
    return {"steady": steady, "ladder": ladder, "sustained_zero_error_webhooks_per_s": best, "progress": progress}


async def row_sizes(url: str) -> dict[str, object]:
    """Mean stored sizes of pre-grown rows against rows the server wrote in the run: the
    pre-grown ones should match what the server writes for the same payloads."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            """SELECT transaction_id LIKE 'txn_S8%' AS grown, count(*) AS n,
                      round(avg(octet_length(raw_body))) AS raw_body_bytes,
                      round(avg(pg_column_size(raw_body))) AS raw_body_stored_bytes,
                      round(avg(pg_column_size(headers))) AS headers_bytes
                 FROM stripe_events GROUP BY 1""")
        logs = await conn.fetch(
            """SELECT transaction_id LIKE 'txn_S8%' AS grown, round(avg(octet_length(data::text))) AS data_bytes
                 FROM transaction_events GROUP BY 1""")
    finally:
        await conn.close()
    out: dict[str, object] = {}
    for r in rows:
        out["pre_grown" if r["grown"] else "served"] = {"stripe_events": r["n"], "raw_body_bytes": float(r["raw_body_bytes"]),
                                                        "raw_body_stored_bytes": float(r["raw_body_stored_bytes"]),
                                                        "headers_bytes": float(r["headers_bytes"])}
    for r in logs:
        out.setdefault("pre_grown" if r["grown"] else "served", {})["log_data_bytes"] = float(r["data_bytes"])
    return out


async def postgres_facts(url: str) -> dict[str, object]:
    conn = await asyncpg.connect(url)
    try:
        version = await conn.fetchval("SELECT version()")
        settings = {r["name"]: r["setting"] + (r["unit"] or "") for r in await conn.fetch(
            """SELECT name, setting, unit FROM pg_settings
                WHERE name IN ('shared_buffers', 'autovacuum', 'autovacuum_naptime', 'autovacuum_vacuum_scale_factor',
                               'autovacuum_vacuum_insert_scale_factor', 'autovacuum_vacuum_cost_limit',
                               'autovacuum_vacuum_cost_delay', 'fsync', 'synchronous_commit', 'max_wal_size')""")}
        data_dir = await conn.fetchval("SELECT setting FROM pg_settings WHERE name = 'data_directory'")
    finally:
        await conn.close()
    try:
        free = shutil.disk_usage(data_dir or "/").free
    except OSError:
        free = shutil.disk_usage("/").free
    return {"version": version, "settings": settings, "disk_free_bytes": free}


def one_size(events: int, args: argparse.Namespace) -> dict[str, object]:
    log(f"size {events:,}: a fresh database")
    database = FreshDatabase(args.pg)
    try:
        facts = asyncio.run(postgres_facts(database.url))
        grown = asyncio.run(grow(database.url, events, args.events_per_day, args.batch)) if events else {"events": 0}
        at_rest = asyncio.run(disk(database.url, events))
        log(f"size {events:,}: {at_rest['database_bytes'] / 2**30:.2f} GiB; serving")
        before = asyncio.run(table_stats(database.url))
        load_before = round(os.getloadavg()[0], 2)  # 1-minute: the machine is shared
        server = Server(database.url, {"PAYSTREAM_DB_POOL": "20"}).start(timeout=120)
        try:
            served = asyncio.run(load(server, database.url, args))
        finally:
            server.stop()  # its backends flush their table statistics as they exit
        after = asyncio.run(table_stats(database.url))
        sent = served["steady"]["webhooks"] + sum(s["webhooks"] for s in served["ladder"])
        after_run = asyncio.run(disk(database.url, events + sent))
        sizes = asyncio.run(row_sizes(database.url))
    finally:
        database.drop()
    return {
        "events_pre_grown": events, "postgres": facts, "pre_grow": grown, "load_average_before_serving": load_before,
        # Per million events at rest after the pre-grow; for the empty database (nothing at
        # rest) per million of the run's own webhooks, after it.
        "disk": at_rest if events else after_run,
        "disk_after_run": {"events": after_run["events"], "database_bytes": after_run["database_bytes"],
                           "tables_total": {k: v["total"] for k, v in after_run["tables"].items() if v["total"] > 16384}},
        "webhooks_sent": sent,
        "steady": served["steady"], "ladder": served["ladder"],
        "sustained_zero_error_webhooks_per_s": served["sustained_zero_error_webhooks_per_s"],
        "autovacuum": vacuum_work(before, after, served["progress"]),
        "row_sizes": sizes,
    }


_RETENTION_SIZES = """
    SELECT (SELECT coalesce(sum(pg_total_relation_size(relid)), 0) FROM pg_partition_tree('stripe_events')
             WHERE isleaf)::bigint AS stripe_events_bytes,
           (SELECT count(*) FROM pg_partition_tree('stripe_events') WHERE isleaf) AS partitions,
           (SELECT count(*) FROM stripe_events) AS stripe_events_rows,
           pg_total_relation_size('transaction_events') AS transaction_events_bytes,
           pg_total_relation_size('transactions') AS transactions_bytes,
           pg_total_relation_size('ledger_entries') AS ledger_entries_bytes,
           pg_database_size(current_database()) AS database_bytes"""


async def steady_retention(server: Server, url: str, args: argparse.Namespace) -> dict[str, object]:
    """Webhooks at --rate for --retention-minutes in chunks of --retention-sample seconds,
    the sizes sampled after each chunk."""
    conn = await asyncpg.connect(url)
    samples, chunks = [], []
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < args.retention_minutes * 60:
            chunk = await step(server, args.rate, args.retention_sample)
            chunks.append({k: chunk[k] for k in ("webhooks", "achieved_per_s", "errors", "not_applied")})
            row = dict(await conn.fetchrow(_RETENTION_SIZES))
            row["t_s"] = round(time.perf_counter() - t0, 1)
            row["webhooks_sent"] = sum(c["webhooks"] for c in chunks)
            samples.append(row)
            log(f"retention: {row['t_s']:.0f} s, stripe_events {row['stripe_events_bytes'] / 2**20:.1f} MiB "
                f"in {row['partitions']} partitions, log {row['transaction_events_bytes'] / 2**20:.1f} MiB")
    finally:
        await conn.close()
    return {"samples": samples, "errors": sum(c["errors"] for c in chunks),
            "not_applied": sum(c["not_applied"] for c in chunks),
            "achieved_per_s": round(sum(c["webhooks"] for c in chunks) / (time.perf_counter() - t0), 1)}


def retention_run(args: argparse.Namespace) -> dict[str, object]:
    """Disk under steady load with retention measured in minutes: stripe_events should stop
    growing once its first partitions pass retention; the log and the ledger, never pruned,
    grow with the payments."""
    log(f"retention: {args.rate:g} webhooks/s for {args.retention_minutes:g} min, events kept "
        f"{args.retention_keep:g} s in partitions of {args.retention_partition:g} s")
    database = FreshDatabase(args.pg)
    env = {"PAYSTREAM_DB_POOL": "20", "PAYSTREAM_PARTITION_INTERVAL": f"{args.retention_partition:g}",
           "PAYSTREAM_RETAIN_STRIPE_EVENTS": f"{args.retention_keep:g}",
           "PAYSTREAM_PRUNE_INTERVAL": f"{args.retention_partition / 3:g}"}
    try:
        server = Server(database.url, env).start(timeout=120)
        try:
            served = asyncio.run(steady_retention(server, database.url, args))
        finally:
            server.stop()
    finally:
        database.drop()
    samples = served["samples"]
    # Retention is reached once the oldest partition's whole range is past it, and the next
    # pass (a third of a partition later) has run.
    reached = args.retention_keep + 2 * args.retention_partition
    after = [r for r in samples if r["t_s"] >= reached]
    out: dict[str, object] = {"rate_per_s": args.rate, "minutes": args.retention_minutes,
                              "retain_stripe_events_s": args.retention_keep,
                              "partition_interval_s": args.retention_partition, "retention_reached_s": reached,
                              **served}
    if len(after) >= 2:
        sizes = [r["stripe_events_bytes"] for r in after]
        first, last = after[0], after[-1]
        minutes = (last["t_s"] - first["t_s"]) / 60
        out["after_retention"] = {
            "samples": len(after), "stripe_events_bytes_min": min(sizes), "stripe_events_bytes_max": max(sizes),
            "stripe_events_bytes_first": first["stripe_events_bytes"], "stripe_events_bytes_last": last["stripe_events_bytes"],
            # Growth of the pruned table per minute once retention is reached, against the
            # log's (never pruned): flat is ~0 against the log's steady growth.
            "stripe_events_growth_bytes_per_min": round((last["stripe_events_bytes"] - first["stripe_events_bytes"]) / minutes),
            "transaction_events_growth_bytes_per_min": round(
                (last["transaction_events_bytes"] - first["transaction_events_bytes"]) / minutes),
            "database_growth_bytes_per_min": round((last["database_bytes"] - first["database_bytes"]) / minutes),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", help="events to pre-grow, comma-separated (default 0,1000000; --quick: 0,20000)")
    parser.add_argument("--quick", action="store_true", help="sizes 0 and 20,000, short steps (under a minute)")
    parser.add_argument("--rate", type=float, help="steady webhooks/s (default 200)")
    parser.add_argument("--seconds", type=float, help="steady phase length (default 20; --quick 4)")
    parser.add_argument("--step-seconds", type=float, help="ladder step length (default 6; --quick 2)")
    parser.add_argument("--rates", help="ladder, webhooks/s, comma-separated")
    parser.add_argument("--pg", choices=["system", "embedded"], default="system",
                        help="embedded: a Postgres of its own per size, with its default settings (autovacuum on)")
    parser.add_argument("--refine", type=int, help="bisecting steps after the ladder (default 2; --quick 1)")
    parser.add_argument("--p99-bound-ms", type=float, default=1000.0, help="a step whose ack p99 passes this is not clean")
    parser.add_argument("--events-per-day", type=int, default=750_000, help="spreads pre-grown events' times (default 750,000)")
    parser.add_argument("--batch", type=int, default=25_000, help="payments per pre-grow statement")
    parser.add_argument("--retention-minutes", type=float,
                        help="then webhooks at --rate this long on a fresh database with retention in minutes, "
                             "sampling disk (default 5; --quick 1.5; 0: skip)")
    parser.add_argument("--retention-keep", type=float, default=60.0,
                        help="PAYSTREAM_RETAIN_STRIPE_EVENTS of that phase, seconds (default 60)")
    parser.add_argument("--retention-partition", type=float, default=15.0,
                        help="PAYSTREAM_PARTITION_INTERVAL of that phase, seconds (default 15)")
    parser.add_argument("--retention-sample", type=float, default=10.0, help="seconds between disk samples (default 10)")
    args = parser.parse_args()
    q = args.quick
    sizes = [int(s) for s in (args.sizes or ("0,20000" if q else "0,1000000")).split(",")]
    args.rate = args.rate or 200.0
    args.seconds = args.seconds or (4.0 if q else 20.0)
    args.step_seconds = args.step_seconds or (2.0 if q else 6.0)
    args.rates = [float(r) for r in (args.rates or ("200,400,600,800" if q else
                                                    "100,200,300,400,600,800,1000,1200,1600")).split(",")]
    args.refine = args.refine if args.refine is not None else (1 if q else 2)
    import uvloop

    uvloop.install()
    if args.retention_minutes is None:
        args.retention_minutes = 1.5 if q else 5.0
    results = [one_size(n, args) for n in sizes]
    retention = retention_run(args) if args.retention_minutes > 0 else None
    empty = next((r for r in results if r["events_pre_grown"] == 0), None)
    for r in results:
        if empty and empty["sustained_zero_error_webhooks_per_s"]:
            r["sustained_rate_vs_empty"] = round(r["sustained_zero_error_webhooks_per_s"]
                                                 / empty["sustained_zero_error_webhooks_per_s"], 3)
    facts = results[0]["postgres"]
    line = {"bench": "s8_storage", "postgres_backend": args.pg, "quick": q, "sizes": sizes, "steady_rate_per_s": args.rate,
            "steady_seconds": args.seconds, "step_seconds": args.step_seconds, "p99_bound_ms": args.p99_bound_ms,
            "bulk_load": BULK_LOAD_NOTE, "results": results, "retention": retention,
            "machine": {**machine(), "postgres": facts["version"].split(" on ")[0], "postgres_settings": facts["settings"],
                        "disk_free_bytes_at_start": facts["disk_free_bytes"]}}
    print(json.dumps(line, default=str))
    save("s8_storage" if args.pg == "system" else f"s8_storage_{args.pg}", json.loads(json.dumps(line, default=str)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
