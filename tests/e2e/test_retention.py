"""Storage that stays bounded (issue 25): retention drops what is past it and touches
nothing still needed; the migration converts a filled database in place while writes go on.

Retention here is measured in seconds (PAYSTREAM_PARTITION_INTERVAL=1,
PAYSTREAM_RETAIN_STRIPE_EVENTS=1): what the tests wait for is the clock passing a
partition's end, polled, never slept."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from paystream import db as paystream_db
from paystream.changes.store import init_connection, new_transaction_id
from paystream.dev import trigger
from paystream.dev.localstripe import LocalStripe
from tests.conftest import Server
from tests.harness import ROOT
from tests.support import Paystream, wait_until
from tests.support import cli as paystream

pytestmark = pytest.mark.e2e

RETENTION_ENV = {
    "PAYSTREAM_PARTITION_INTERVAL": "1",
    "PAYSTREAM_RETAIN_STRIPE_EVENTS": "1",
    "PAYSTREAM_RETAIN_DELIVERED": "60",
    "PAYSTREAM_RETAIN_IDEMPOTENCY_KEYS": "60",
    # The test runs each pass itself (`paystream prune`), and nothing else moves its rows.
    "PAYSTREAM_PRUNE_INTERVAL": "3600",
    "PAYSTREAM_RECOVERY_INTERVAL": "3600",
    "PAYSTREAM_PARKED_EXPIRY": "3600",
    "PAYSTREAM_BACKFILL_INTERVAL": "86400",
}


async def prune(env: dict[str, str], *extra: str) -> dict:
    done = await asyncio.to_thread(paystream, "prune", *extra, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


async def counts(db: asyncpg.Connection) -> dict[str, int]:
    return {table: await db.fetchval(f"SELECT count(*) FROM {table}")
            for table in ("transactions", "transaction_events", "ledger_entries", "refunds")}


async def past_its_partition(db: asyncpg.Connection, event_ids: list[str]) -> None:
    """Wait for the database clock to pass the end of the newest of these events' 1-second
    partitions, plus the 1-second retention."""
    newest = await db.fetchval("SELECT max(received_at) FROM stripe_events WHERE id = ANY($1)", event_ids)

    async def passed() -> bool:
        return await db.fetchval("SELECT clock_timestamp() > date_trunc('second', $1::timestamptz) + interval '2 s'",
                                 newest)

    await wait_until(passed, timeout=10, what="the events' partition to pass retention")


async def test_prune_drops_processed_events_and_nothing_still_needed(
        own_database: str, fresh_stripe: LocalStripe) -> None:
    await paystream_db.migrate(own_database)
    server = Server(own_database, {"STRIPE_API_BASE": fresh_stripe.url, **RETENTION_ENV})
    await asyncio.to_thread(server.start)
    db = await asyncpg.connect(own_database)
    await init_connection(db)
    try:
        async with Paystream(server) as ps:
            # Processed events (each a payment, logged, on the ledger)...
            processed = []
            for amount in (1000, 2000, 3000, 4000):
                event = ps.event("payment_intent.succeeded", trigger.stripe_id("pi_"), amount=amount)
                assert (await ps.deliver(event))["outcome"] == "applied"
                processed.append(event["id"])
            await past_its_partition(db, processed)
            # ... then, in later partitions, events still needed: one parked for a
            # transaction not written yet, one kept unapplied (invalid).
            parked = ps.event("payment_intent.processing", trigger.stripe_id("pi_"),
                              metadata={"transaction_id": new_transaction_id()})
            assert (await ps.deliver(parked))["outcome"] == "parked"
            invalid = ps.event("payment_intent.processing", trigger.stripe_id("pi_"))
            invalid["data"]["object"]["amount"] = -5
            assert (await ps.deliver(invalid))["outcome"] == "invalid"
            needed = [parked["id"], invalid["id"]]
            await past_its_partition(db, needed)

            # Rows of the tables pruned row by row: old and done, old but still needed, recent.
            txns = [r["id"] for r in await db.fetch("SELECT id FROM transactions ORDER BY id")]
            old, recent = "clock_timestamp() - interval '1 hour'", "clock_timestamp()"
            for i, (delivered, failed) in enumerate([(old, "NULL"), ("NULL", "NULL"), (recent, "NULL"),
                                                     ("NULL", old)]):
                await db.execute(
                    f"""INSERT INTO outbound_deliveries (webhook_id, transaction_id, seq, queued_at,
                                                         delivered_at, failed_at, next_attempt_at)
                        VALUES ($1, $2, 1, {old}, {delivered}, {failed},
                                CASE WHEN {delivered} IS NULL AND {failed} IS NULL THEN clock_timestamp() END)""",
                    f"msg_retention_{i}", txns[i])
            for kind, txn, done in [("cancel_validation", txns[0], old), ("expire_authorization", txns[0], "NULL"),
                                    ("read_subscription", txns[0], recent)]:
                await db.execute(f"INSERT INTO outbox (kind, transaction_id, created_at, done_at)"
                                 f" VALUES ($1, $2, {old}, {done})", kind, txn)
            for key, created, claimed_until in [("old", old, "NULL"), ("old-claimed", old, "clock_timestamp() + interval '1 hour'"),
                                                ("recent", recent, "NULL")]:
                await db.execute(f"INSERT INTO idempotency_keys (key, request_hash, created_at, claim, claimed_until)"
                                 f" VALUES ($1, 'h', {created}, CASE WHEN {claimed_until} IS NULL THEN NULL ELSE 'c' END,"
                                 f" {claimed_until})", key)
            before = await counts(db)
            partitions_before = await db.fetchval("SELECT count(*) FROM pg_inherits WHERE inhparent = 'stripe_events'::regclass")

            # --dry-run: lists and counts, changes nothing.
            dry = await prune(server.env, "--dry-run")
            assert dry["dry_run"] and dry["stripe_events"]["partitions_dropped"]
            assert dry["stripe_events"]["unprocessed_moved_forward"] == 2
            assert await db.fetchval("SELECT count(*) FROM stripe_events WHERE first_received_at IS NOT NULL") == 0
            assert dry["rows_deleted"] == {"stripe_events_default": 0, "outbound_deliveries": 1, "outbox": 1,
                                           "idempotency_keys": 1}
            assert await db.fetchval("SELECT count(*) FROM stripe_events WHERE id = ANY($1)", processed) == 4
            assert await db.fetchval("SELECT count(*) FROM pg_inherits WHERE inhparent = 'stripe_events'::regclass") \
                == partitions_before
            assert await db.fetchval("SELECT count(*) FROM outbound_deliveries") == 4

            report = await prune(server.env)
            assert report["ran"] and not report["dry_run"]
            dropped = {p["partition"] for p in report["stripe_events"]["partitions_dropped"]}
            assert dropped and report["stripe_events"]["bytes_freed"] > 0
            assert report["errors"] == [] and report["stripe_events"]["partitions_kept"] == []
            # Gone: every processed event, whole partitions of them.
            assert await db.fetchval("SELECT count(*) FROM stripe_events WHERE id = ANY($1)", processed) == 0
            # Kept: the parked and the unapplied events, bodies and all, moved forward out of
            # the partitions that went, with when they first came.
            assert report["stripe_events"]["unprocessed_moved_forward"] == 2
            still = await db.fetch("SELECT id, tableoid::regclass::text AS part, raw_body, processed_at, outcome,"
                                   " first_received_at, received_at FROM stripe_events WHERE id = ANY($1)", needed)
            assert {r["id"] for r in still} == set(needed)
            assert all(r["processed_at"] is None and r["part"] not in dropped for r in still)
            assert all(r["first_received_at"] is not None and r["first_received_at"] < r["received_at"] for r in still)
            assert {r["id"]: r["outcome"] for r in still} == {parked["id"]: "parked", invalid["id"]: "invalid"}
            assert json.loads(next(r for r in still if r["id"] == parked["id"])["raw_body"]) == parked
            assert await db.fetchval("SELECT count(*) FROM parked_events WHERE stripe_event_id = $1", parked["id"]) == 1
            # The log, the ledger, transactions and refunds: untouched.
            assert await counts(db) == before
            # Row by row: only what is done and past its retention.
            assert sorted(r["webhook_id"] for r in await db.fetch("SELECT webhook_id FROM outbound_deliveries")) == \
                ["msg_retention_1", "msg_retention_2", "msg_retention_3"]  # pending, recent, failed
            assert sorted(r["kind"] for r in await db.fetch("SELECT kind FROM outbox")) == \
                ["expire_authorization", "read_subscription"]  # pending, recently done
            assert sorted(r["key"] for r in await db.fetch("SELECT key FROM idempotency_keys")) == ["old-claimed", "recent"]
            assert report["rows_deleted"] == {"stripe_events_default": 0, "outbound_deliveries": 1, "outbox": 1,
                                              "idempotency_keys": 1}

            # The server goes on: a new event is stored in a partition of now and applied; the
            # parked one, delivered again, is still the one event.
            event = ps.event("payment_intent.succeeded", trigger.stripe_id("pi_"), amount=5000)
            assert (await ps.deliver(event))["outcome"] == "applied"
            part = await db.fetchval("SELECT tableoid::regclass::text FROM stripe_events WHERE id = $1", event["id"])
            assert part.startswith("stripe_events_p"), part
            assert (await ps.deliver(parked))["outcome"] in ("parked", "duplicate")
            assert await db.fetchval("SELECT count(*) FROM stripe_events WHERE id = $1", parked["id"]) == 1
            again = await prune(server.env)
            assert not {p["partition"] for p in again["stripe_events"]["partitions_dropped"]} & dropped
        check = await asyncio.to_thread(paystream, "ledger", "--check", env=server.env)
        assert check.returncode == 0, check.stdout[-2000:]
    finally:
        await db.close()
        server.stop()


async def test_the_servers_own_passes_beside_webhooks_lose_nothing(
        own_database: str, fresh_stripe: LocalStripe) -> None:
    """Passes made by the server itself (every 0.2 s; partitions of a second, kept a
    second) beside a stream of webhooks: partitions made ahead, dropped behind, and every
    webhook answered 200 and applied once, none lost to a partition made or dropped under it."""
    await paystream_db.migrate(own_database)
    server = Server(own_database, {"STRIPE_API_BASE": fresh_stripe.url, **RETENTION_ENV,
                                   "PAYSTREAM_PRUNE_INTERVAL": "0.2"})
    await asyncio.to_thread(server.start)
    db = await asyncpg.connect(own_database)
    try:
        async with Paystream(server) as ps:
            events = [ps.event("payment_intent.succeeded", trigger.stripe_id("pi_"), amount=100 + i)
                      for i in range(300)]
            for batch in range(0, len(events), 20):
                answers = await asyncio.gather(*(ps.deliver(e) for e in events[batch:batch + 20]))
                assert {a["outcome"] for a in answers} == {"applied"}
            ids = [e["id"] for e in events]

            async def dropped() -> bool:
                metrics = (await ps.http.get("/metrics")).text
                line = next(x for x in metrics.splitlines() if x.startswith("paystream_partitions_dropped_total "))
                return float(line.split()[1]) >= 2 and await db.fetchval(
                    "SELECT count(*) FROM stripe_events WHERE id = ANY($1)", ids) == 0

            await wait_until(dropped, timeout=30, what="the server to drop the events' partitions")
            assert await db.fetchval("SELECT count(*) FROM transaction_events WHERE stripe_event_id = ANY($1)",
                                     ids) == 300
            assert await db.fetchval("SELECT count(DISTINCT transaction_id) FROM transaction_events"
                                     " WHERE stripe_event_id = ANY($1)", ids) == 300
            assert await db.fetchval("SELECT count(*) FROM stripe_events_default") == 0
    finally:
        await db.close()
        server.stop()


async def test_the_migration_converts_a_filled_database_in_place(
        own_database: str, fresh_stripe: LocalStripe, tmp_path: Path) -> None:
    """A database filled through the schema before issue 25 (migrations 001-015) is
    converted by `paystream migrate` while writes go on: no row lost, no insert held for
    more than seconds, and the converted table dedups events it held before."""
    old = tmp_path / "migrations"
    old.mkdir()
    for path in sorted((ROOT / "db" / "migrations").glob("*.sql")):
        if int(path.name[:3]) <= 15:
            shutil.copy(path, old)
    env = {**Server(own_database).env, "PAYSTREAM_MIGRATIONS": str(old)}
    done = await asyncio.to_thread(paystream, "migrate", env=env)
    assert done.returncode == 0, done.stderr
    db = await asyncpg.connect(own_database)
    try:
        assert await db.fetchval("SELECT relkind::text FROM pg_class WHERE relname = 'stripe_events'") == "r"
        filled = 20_000
        body = json.dumps({"filler": "x" * 2500})
        await db.execute(
            """INSERT INTO stripe_events (id, type, object_id, created, raw_body, headers, received_at,
                                          processed_at, outcome)
               SELECT 'evt_filled_' || g, 'payment_intent.succeeded', 'pi_filled_' || g,
                      clock_timestamp() - interval '1 day', $1, '{}',
                      clock_timestamp() - (g || ' seconds')::interval,
                      CASE WHEN g % 100 <> 0 THEN clock_timestamp() END,
                      CASE WHEN g % 100 <> 0 THEN 'applied' END
                 FROM generate_series(1, $2) g""", body, filled)

        # Writes beside the migration, as webhooks would make them (a plain insert: the
        # statement both schemas take).
        written, longest, stop = 0, 0.0, asyncio.Event()

        async def writer() -> None:
            nonlocal written, longest
            conn = await asyncpg.connect(own_database)
            try:
                while not stop.is_set():
                    started = time.monotonic()
                    await conn.execute("INSERT INTO stripe_events (id, type, raw_body, headers)"
                                       " VALUES ($1, 'payment_intent.created', '{}', '{}')",
                                       f"evt_during_{written}")
                    longest = max(longest, time.monotonic() - started)
                    written += 1
            finally:
                await conn.close()

        task = asyncio.create_task(writer())
        await wait_until(lambda: asyncio.sleep(0, written > 10), what="the writer to be writing")
        env["PAYSTREAM_MIGRATIONS"] = str(ROOT / "db" / "migrations")
        done = await asyncio.to_thread(paystream, "migrate", env=env)
        stop.set()
        await task
        assert done.returncode == 0, done.stderr
        assert "016_retention_indexes.sql, 017_partitioned_stripe_events.sql" in done.stdout + done.stderr

        assert await db.fetchval("SELECT relkind::text FROM pg_class WHERE relname = 'stripe_events'") == "p"
        assert await db.fetchval("SELECT count(*) FROM stripe_events") == filled + written
        assert await db.fetchval("SELECT count(DISTINCT id) FROM stripe_events") == filled + written
        assert await db.fetchval("SELECT count(*) FROM stripe_events WHERE processed_at IS NULL"
                                 " AND id LIKE 'evt_filled_%'") == filled // 100
        assert await db.fetchval("SELECT count(*) FROM stripe_events_legacy") == filled + written
        assert longest < 5, f"an insert waited {longest:.1f} s during the migration"

        server = Server(own_database, {"STRIPE_API_BASE": fresh_stripe.url, **RETENTION_ENV,
                                       "PAYSTREAM_RETAIN_STRIPE_EVENTS": "3600"})
        await asyncio.to_thread(server.start)
        try:
            async with Paystream(server) as ps:
                # An event the old table held, delivered again: the one it already is.
                again = ps.event("payment_intent.succeeded", "pi_filled_7", amount=700)
                again["id"] = "evt_filled_7"
                assert (await ps.deliver(again))["outcome"] == "duplicate"
                assert await db.fetchval("SELECT count(*) FROM stripe_events WHERE id = 'evt_filled_7'") == 1
                fresh = ps.event("payment_intent.succeeded", trigger.stripe_id("pi_"), amount=900)
                assert (await ps.deliver(fresh))["outcome"] == "applied"
                part = await db.fetchval("SELECT tableoid::regclass::text FROM stripe_events WHERE id = $1",
                                         fresh["id"])
                assert part in ("stripe_events_legacy",) or part.startswith("stripe_events_p"), part
            report = await prune(server.env, "--dry-run")
            # The converted table is one partition, ending at the cutoff: not past retention yet.
            assert report["stripe_events"]["partitions_dropped"] == []
            assert timedelta(seconds=report["retention_seconds"]["stripe_events"]) == timedelta(hours=1)
        finally:
            server.stop()
    finally:
        await db.close()
