"""Storage that stays bounded (issue 25): partitions made ahead, and retention per kind.

- Stripe events (`stripe_events`, partitioned by `received_at`, migration 017): a partition
  whose whole range is older than PAYSTREAM_RETAIN_STRIPE_EVENTS (35 days: past Stripe's
  30-day event window, so a backfill still recognises every event it lists) is dropped
  whole, no row deleted, no vacuum debt.  The few events in it not processed (failed,
  invalid, parked: what an operator may still need) are first moved forward, one at a time
  under their id's lock, into the current partition (`first_received_at` keeps when they
  came); a partition one of them could not leave is kept and counted
  (`paystream_partitions_kept`).
- Rows pruned in bounded batches, then vacuumed: delivered outbound webhooks and finished
  outbox jobs after PAYSTREAM_RETAIN_DELIVERED (7 days); idempotency keys after
  PAYSTREAM_RETAIN_IDEMPOTENCY_KEYS (24 hours, Stripe's own window), never one whose claim
  is live.  Pending or failed deliveries, pending jobs, the transaction log
  (`transaction_events`), the ledger, refunds and transactions are never touched.
- Parked events end by expiring (payments/recovery.py); the broker outbox is deleted as
  it is published.  Both stay small without retention.

Partitions are made ahead of time (three partition intervals, or two maintenance
intervals if longer), so a webhook always finds its partition; rows that reached the
default partition (maintenance stopped for that long) are moved into their own.

One pass at a time across every process: each pass (and each start-up's partitions)
holds a transaction-scoped advisory lock on a connection of its own (pooler-safe, as the
backfill's), and does its work on others, each step its own short transaction whose DDL
waits at most LOCK_TIMEOUT for its lock (a step that cannot get it is left to the next
pass, and one that fails is reported and does not stop the others).  Every step is safe to
repeat.  Locks are taken parent first (stripe_events, then a partition, then the default
partition), the order every statement on stripe_events takes them in.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from paystream.background import BackgroundTask
from paystream.db import ACQUIRE_TIMEOUT, DATABASE_ERRORS
from paystream.ops import metrics

log = logging.getLogger("paystream.retention")

_LOCK = 0x7061_7973_7072_756E  # "paysprun": one pass at a time across the deployment
LOCK_TIMEOUT = "2s"
# Maintenance statements (VACUUM, counts, drops) may take longer than the pool's 10 s
# command timeout on a big table.
STATEMENT_TIMEOUT = 3600.0
BATCH = 5000
MAX_AHEAD_PARTITIONS = 200
RETRY = 30.0  # seconds between tries to make partitions while the schema is behind
PARENT = "stripe_events"
DEFAULT_PARTITION = "stripe_events_default"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

DAY = 86400.0


@dataclass(frozen=True, slots=True)
class Retention:
    """How long each kind of data is kept, in seconds (0: forever), and the partitions' size."""

    stripe_events: float = 35 * DAY
    delivered: float = 7 * DAY
    idempotency_keys: float = DAY
    partition_interval: float = DAY
    maintenance_interval: float = 3600.0

    @classmethod
    def from_settings(cls, settings: Any) -> Retention:
        return cls(stripe_events=settings.retain_stripe_events_seconds,
                   delivered=settings.retain_delivered_seconds,
                   idempotency_keys=settings.retain_idempotency_keys_seconds,
                   partition_interval=settings.partition_interval_seconds,
                   maintenance_interval=settings.prune_interval_seconds)

    def as_json(self) -> dict[str, float]:
        return {"stripe_events": self.stripe_events, "outbound_deliveries": self.delivered,
                "outbox": self.delivered, "idempotency_keys": self.idempotency_keys,
                "partition_interval": self.partition_interval}


@dataclass(slots=True)
class Partition:
    name: str
    lo: datetime | None  # None: MINVALUE
    hi: datetime | None  # None: MAXVALUE
    default: bool = False


@dataclass(slots=True)
class PruneReport:
    dry_run: bool
    retention: Retention
    ran: bool = True  # False: another process held the lock
    at: datetime | None = None
    partitions_created: list[str] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    kept: list[dict[str, Any]] = field(default_factory=list)
    deleted: dict[str, int] = field(default_factory=dict)
    moved_forward: int = 0  # events not processed, moved out of a partition before its drop
    skipped: list[str] = field(default_factory=list)  # steps that could not get their lock
    errors: list[str] = field(default_factory=list)  # steps that failed (the others went on)

    def as_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "ran": self.ran,
            "at": self.at.isoformat() if self.at else None,
            "retention_seconds": self.retention.as_json(),
            "partitions_created": self.partitions_created,
            "stripe_events": {"partitions_dropped": self.dropped, "partitions_kept": self.kept,
                              "unprocessed_moved_forward": self.moved_forward,
                              "bytes_freed": sum(d["bytes"] for d in self.dropped)},
            "rows_deleted": self.deleted,
            "skipped": self.skipped,
            "errors": self.errors,
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


async def partitions(pool: asyncpg.Pool) -> list[Partition]:
    """stripe_events' partitions with their bounds, oldest first (the default last).  The
    bounds are read back through Postgres' own timestamptz parsing, in ISO DateStyle, so
    the session's settings cannot skew them."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
        await conn.execute("SET LOCAL DateStyle = 'ISO, YMD'")
        rows = await _partition_rows(conn)
    found = [Partition(r["name"], None if r["is_default"] else r["lo"], None if r["is_default"] else r["hi"],
                       r["is_default"]) for r in rows]
    return sorted(found, key=lambda p: (p.default, p.lo or datetime.min.replace(tzinfo=UTC)))


async def _partition_rows(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch(
        r"""SELECT c.relname AS name, b.bound = 'DEFAULT' AS is_default,
                   CASE WHEN b.bound ~ 'FROM \(MINVALUE\)' THEN NULL
                        ELSE substring(b.bound FROM $$FROM \('([^']+)'\)$$)::timestamptz END AS lo,
                   CASE WHEN b.bound ~ 'TO \(MAXVALUE\)' THEN NULL
                        ELSE substring(b.bound FROM $$TO \('([^']+)'\)$$)::timestamptz END AS hi
              FROM pg_inherits i
              JOIN pg_class c ON c.oid = i.inhrelid
             CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS bound) b
             WHERE i.inhparent = 'stripe_events'::regclass""")


def slot(at: datetime, interval: float) -> tuple[datetime, datetime]:
    """The interval-aligned range (from the Unix epoch, UTC) holding `at`."""
    step = timedelta(seconds=interval)
    n = (at - EPOCH) // step
    lo = EPOCH + n * step
    return lo, lo + step


def _clip(lo: datetime, hi: datetime, existing: list[Partition]) -> tuple[datetime, datetime] | None:
    """[lo, hi) less what existing range partitions cover (they may have other sizes: the
    converted table, or an earlier PAYSTREAM_PARTITION_INTERVAL); None if nothing is left."""
    for p in existing:
        if p.default:
            continue
        plo = p.lo or datetime.min.replace(tzinfo=UTC)
        phi = p.hi or datetime.max.replace(tzinfo=UTC)
        if plo <= lo < phi:
            lo = phi
        if lo < plo < hi:
            hi = plo
        if lo >= hi:
            return None
    return lo, hi


def partition_name(lo: datetime) -> str:
    return f"stripe_events_p{lo.astimezone(UTC):%Y%m%d_%H%M%S}"


async def _now(pool: asyncpg.Pool) -> datetime:
    return await pool.fetchval("SELECT clock_timestamp()")  # the database's clock, every node's


async def ensure_partitions(pool: asyncpg.Pool, retention: Retention, report: PruneReport | None = None,
                            since: datetime | None = None) -> list[str]:
    """Make the partitions from the current one (or the one holding `since`: a bulk load of
    past events) to three intervals ahead (or two maintenance intervals, if longer), and one
    for each range rows in the default partition fell into; return the names made."""
    now = await _now(pool)
    interval = retention.partition_interval
    ahead = max(3 * interval, 2 * retention.maintenance_interval)
    lo, _ = slot(min(since or now, now), interval)
    count = int((now - lo).total_seconds() // interval) + min(MAX_AHEAD_PARTITIONS, int(ahead // interval) + 2)
    wanted = [slot(lo + timedelta(seconds=interval * i), interval) for i in range(count)]
    strays = await pool.fetch(
        f"SELECT DISTINCT floor(extract(epoch FROM received_at) / $1)::bigint AS n FROM {DEFAULT_PARTITION} LIMIT 1000",
        interval)
    wanted += [slot(EPOCH + timedelta(seconds=r["n"] * interval), interval) for r in strays]
    made: list[str] = []
    for want_lo, want_hi in sorted(set(wanted)):
        existing = await partitions(pool)
        clipped = _clip(want_lo, want_hi, existing)
        if clipped is None:
            continue
        name = partition_name(clipped[0])
        try:
            await _create_partition(pool, name, *clipped)
        except asyncpg.LockNotAvailableError:
            if report is not None:
                report.skipped.append(f"create {name}: lock not available within {LOCK_TIMEOUT}")
            continue
        except asyncpg.DuplicateTableError:
            continue  # another process made it since we looked
        except asyncpg.CheckViolationError:
            # Rows reached the default partition in that range between our look and the
            # lock: the next pass moves them.
            if report is not None:
                report.skipped.append(f"create {name}: rows arrived in the default partition meanwhile")
            continue
        made.append(name)
        log.info("made partition %s [%s, %s)", name, clipped[0].isoformat(), clipped[1].isoformat())
    if report is not None:
        report.partitions_created += made
    return made


async def _create_partition(pool: asyncpg.Pool, name: str, lo: datetime, hi: datetime) -> None:
    """A table of its own, rows of its range moved from the default partition, attached:
    ATTACH takes a lock on stripe_events that lets statements on it go on (SHARE UPDATE
    EXCLUSIVE); the default partition, which every lookup reads, is held for a moment."""
    strays = await pool.fetchval(
        f"SELECT EXISTS (SELECT FROM {DEFAULT_PARTITION} WHERE received_at >= $1 AND received_at < $2)", lo, hi)
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        # ATTACH's own lock on the parent, taken first.  Rows to move out of the default
        # partition need more: a statement planned before the move, against the old list
        # of partitions, would not see them in the new one (and could store an event
        # again), so then no statement on stripe_events runs meanwhile, for this moment.
        mode = "ACCESS EXCLUSIVE" if strays else "SHARE UPDATE EXCLUSIVE"
        await conn.execute(f"LOCK TABLE ONLY {PARENT} IN {mode} MODE")
        await conn.execute(f"LOCK TABLE {DEFAULT_PARTITION} IN ACCESS EXCLUSIVE MODE")
        await conn.execute(f"CREATE TABLE {name} (LIKE {PARENT} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
        moved = await conn.execute(
            f"""WITH moved AS (DELETE FROM {DEFAULT_PARTITION} WHERE received_at >= $1 AND received_at < $2
                               RETURNING *)
                INSERT INTO {name} SELECT * FROM moved""", lo, hi, timeout=STATEMENT_TIMEOUT)
        await conn.execute(f"ALTER TABLE {PARENT} ATTACH PARTITION {name} FOR VALUES FROM ('{lo.isoformat()}') "
                           f"TO ('{hi.isoformat()}')", timeout=STATEMENT_TIMEOUT)
    if moved.split()[-1] != "0":
        log.warning("moved %s Stripe events from the default partition into %s (maintenance was late)",
                    moved.split()[-1], name)


async def prune(pool: asyncpg.Pool, retention: Retention, *, dry_run: bool = False) -> PruneReport:
    """One pass: partitions made ahead, then what is past retention dropped or deleted (or,
    with dry_run, only listed and counted; nothing made or changed)."""
    report = PruneReport(dry_run=dry_run, retention=retention)
    if dry_run:
        report.at = await _now(pool)
        await _prune_steps(pool, retention, report)
        return report
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as lock_conn, lock_conn.transaction():
        if not await lock_conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK):
            report.ran = False
            return report
        try:
            await ensure_partitions(pool, retention, report)
        except DATABASE_ERRORS as exc:
            report.errors.append(f"make partitions: {type(exc).__name__}: {exc}")
        report.at = await _now(pool)
        await _prune_steps(pool, retention, report)
    metrics.PRUNE_RUNS.inc()
    return report


async def partitions_at_start(pool: asyncpg.Pool, retention: Retention) -> bool:
    """The partitions for now and ahead, under the pass's lock (False: another process held
    it, and is making them)."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as lock_conn, lock_conn.transaction():
        if not await lock_conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK):
            return False
        await ensure_partitions(pool, retention)
        return True


async def _prune_steps(pool: asyncpg.Pool, retention: Retention, report: PruneReport) -> None:
    assert report.at is not None
    now = report.at
    if retention.stripe_events > 0:
        try:
            await _prune_stripe_events(pool, now - timedelta(seconds=retention.stripe_events), report)
        except DATABASE_ERRORS as exc:
            report.errors.append(f"stripe_events: {type(exc).__name__}: {exc}")
    steps = [
        ("outbound_deliveries", retention.delivered,
         "SELECT id FROM outbound_deliveries WHERE delivered_at < $1", "id"),
        ("outbox", retention.delivered,
         "SELECT id FROM outbox WHERE done_at < $1", "id"),
        ("idempotency_keys", retention.idempotency_keys,
         "SELECT key FROM idempotency_keys WHERE created_at < $1"
         " AND (claimed_until IS NULL OR claimed_until < clock_timestamp())", "key"),
    ]
    for table, keep, select, key in steps:
        if keep <= 0:
            continue
        before = now - timedelta(seconds=keep)
        try:
            if report.dry_run:
                report.deleted[table] = await pool.fetchval(f"SELECT count(*) FROM ({select}) s", before,
                                                            timeout=STATEMENT_TIMEOUT)
                continue
            report.deleted[table] = n = await _delete_batches(
                pool, f"DELETE FROM {table} WHERE {key} IN ({select} LIMIT $2 FOR UPDATE SKIP LOCKED)", before)
            if n:
                metrics.PRUNED_ROWS.labels(table).inc(n)
                # The space the rows held is reused by the next ones (autovacuum may be off or slow).
                await pool.execute(f"VACUUM (ANALYZE) {table}", timeout=STATEMENT_TIMEOUT)
        except DATABASE_ERRORS as exc:
            report.errors.append(f"{table}: {type(exc).__name__}: {exc}")


async def _delete_batches(pool: asyncpg.Pool, sql: str, before: datetime) -> int:
    total = 0
    while True:
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
            done = int((await conn.execute(sql, before, BATCH, timeout=STATEMENT_TIMEOUT)).split()[-1])
        total += done
        if done < BATCH:
            return total


async def _prune_stripe_events(pool: asyncpg.Pool, before: datetime, report: PruneReport) -> None:
    kept = 0
    for part in await partitions(pool):
        if part.default or part.hi is None or part.hi > before:
            continue
        unprocessed = await pool.fetch(f"SELECT id, received_at FROM {part.name} WHERE processed_at IS NULL",
                                       timeout=STATEMENT_TIMEOUT)
        if unprocessed and report.dry_run:
            report.moved_forward += len(unprocessed)
        elif unprocessed:
            report.moved_forward += await _move_forward(pool, unprocessed)
            left = await pool.fetchval(f"SELECT count(*) FROM {part.name} WHERE processed_at IS NULL",
                                       timeout=STATEMENT_TIMEOUT)
            if left:
                kept += 1
                report.kept.append({"partition": part.name, "from": _iso(part.lo), "to": _iso(part.hi),
                                    "unprocessed": left})
                continue
        size = await pool.fetchrow(
            "SELECT pg_total_relation_size(c.oid) AS bytes, greatest(c.reltuples, 0)::bigint AS rows"
            " FROM pg_class c WHERE c.oid = $1::regclass", part.name)
        entry = {"partition": part.name, "from": _iso(part.lo), "to": _iso(part.hi),
                 "rows_estimate": size["rows"], "bytes": size["bytes"]}
        if report.dry_run:
            report.dropped.append(entry)
            continue
        try:
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                # The parent first, as every statement on stripe_events locks it (a lock on
                # the partition first would deadlock with one that holds the parent and
                # wants the partition); DROP needs both.  Webhooks wait for these few
                # milliseconds.  No write reaches the partition while we look again: nothing
                # not processed goes.
                await conn.execute(f"LOCK TABLE ONLY {PARENT} IN ACCESS EXCLUSIVE MODE")
                await conn.execute(f"LOCK TABLE {part.name} IN ACCESS EXCLUSIVE MODE")
                if await conn.fetchval(f"SELECT EXISTS (SELECT FROM {part.name} WHERE processed_at IS NULL)"):
                    continue
                await conn.execute(f"DROP TABLE {part.name}", timeout=STATEMENT_TIMEOUT)
        except asyncpg.LockNotAvailableError:
            report.skipped.append(f"drop {part.name}: lock not available within {LOCK_TIMEOUT}")
            continue
        report.dropped.append(entry)
        metrics.PARTITIONS_DROPPED.inc()
        log.info("dropped partition %s [%s, %s): %s bytes of processed Stripe events",
                 part.name, entry["from"], entry["to"], entry["bytes"])
    metrics.PARTITIONS_KEPT.set(kept)
    # Rows only the default partition took (maintenance stopped for long): by row.
    select = f"SELECT id FROM {DEFAULT_PARTITION} WHERE received_at < $1 AND processed_at IS NOT NULL"
    if report.dry_run:
        report.deleted["stripe_events_default"] = await pool.fetchval(f"SELECT count(*) FROM ({select}) s", before)
    else:
        report.deleted["stripe_events_default"] = await _delete_batches(
            pool, f"DELETE FROM {DEFAULT_PARTITION} WHERE id IN ({select} LIMIT $2)", before)


async def _move_forward(pool: asyncpg.Pool, rows: list[asyncpg.Record]) -> int:
    """Move events not processed into the partition of now, each under its id's lock (the
    one every delivery of it takes: paystream_store_event), keeping when it first came.
    Nothing about the event changes but where it lies; its floor (created less a day) still
    holds, as received_at only grows."""
    moved = 0
    for row in rows:
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('paystream-stripe-event:' || $1, 0))",
                               row["id"])
            done = await conn.execute(
                """UPDATE stripe_events
                      SET first_received_at = coalesce(first_received_at, received_at),
                          received_at = clock_timestamp()
                    WHERE id = $1 AND received_at = $2 AND processed_at IS NULL""", row["id"], row["received_at"])
        moved += int(done.split()[-1])
    if moved:
        log.info("moved %s Stripe events not processed out of a partition past retention", moved)
    return moved


class Maintainer(BackgroundTask):
    """Every server: partitions made at start-up, then a prune pass every
    maintenance_interval seconds (one process at a time)."""

    task_name = "paystream-retention"

    def __init__(self, pool: asyncpg.Pool, retention: Retention) -> None:
        self.pool, self.retention = pool, retention

    ready = False  # partitions made (or being made by another process) since start-up

    async def start_up(self) -> None:
        """Partitions for now and ahead, before the first webhook (a failure is logged and
        tried again every RETRY seconds: the default partition takes rows meanwhile, and
        the next pass moves them)."""
        try:
            await partitions_at_start(self.pool, self.retention)
            self.ready = True
        except DATABASE_ERRORS as exc:
            log.warning("could not make stripe_events' partitions (the schema behind?): %s", exc)

    async def _forever(self) -> None:
        while not self.ready:  # the schema was behind at start-up: until `paystream migrate`
            await asyncio.sleep(min(RETRY, self.retention.maintenance_interval))
            await self.start_up()
        while True:
            await asyncio.sleep(self.retention.maintenance_interval)
            try:
                report = await prune(self.pool, self.retention)
            except DATABASE_ERRORS as exc:
                log.warning("retention pass failed: %s", exc)
                continue
            except Exception:
                log.exception("retention pass failed")
                continue
            if (report.dropped or report.kept or any(report.deleted.values()) or report.skipped
                    or report.errors or report.moved_forward):
                log.info("retention: %s", json.dumps(report.as_json()))
