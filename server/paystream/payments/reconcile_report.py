"""Reconciliation that reports: every transaction touched in a window read back from
Stripe and compared, field by field, with what paystream holds; nothing is changed.

`paystream reconcile --report [--since TIME]` prints each difference as a JSON line and
then a summary.  Every server process runs it every PAYSTREAM_RECONCILE_INTERVAL (default
daily; 0: never), one process at a time (a transaction-scoped advisory lock, so a
transaction-mode pooler is fine) and once per interval across them all (the last run is
recorded in paystream_config; a new deployment's first is one interval after its first
start), over the transactions moved since the previous window ended up to a minute ago
(what moved in the last minute may have its webhook on the way: the next run reads it);
each difference is counted in paystream_reconcile_differences_total{field} and logged as
one line.

What Stripe's object means in our terms comes from the mapping the sweeper and refresh
apply (payments/current.change_from_object, ingest/subscriptions.change_of), so a report
and a repair can never disagree about what Stripe says.  Compared: status, amount,
amount_refunded and dispute (for a PaymentIntent, from its latest charge); for a
subscription its status and what a period costs; for a Checkout Session its status and
total; for an invoice and a SetupIntent their status.  Reads go through StripeApi, behind
the circuit breaker and the process's call budget."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from paystream.background import BackgroundTask
from paystream.changes.lifecycle import RANK, stripe_now
from paystream.db import ACQUIRE_TIMEOUT, DATABASE_ERRORS
from paystream.ingest import subscriptions as subscription_meaning
from paystream.ops import metrics
from paystream.payments.current import change_from_object
from paystream.payments.stripe_api import StripeApi, StripeFailure

log = logging.getLogger("paystream.reconcile")

FIELDS = ("status", "amount", "amount_refunded", "dispute")
_LOCK = 7_400_003  # one periodic report at a time across every process on the database
CONFIG_KEY = "reconcile_report"  # paystream_config: when the last periodic report began and ended
_PAGE = 500  # transactions read from the database at a time
IN_FLIGHT_SECONDS = 60.0  # the periodic report leaves changes this recent to the next one
_ERRORS_KEPT = 100  # a summary's errors: the first ones say what went wrong


@dataclass(frozen=True, slots=True)
class Difference:
    transaction_id: str
    stripe_id: str
    kind: str
    field: str
    ours: Any
    stripe: Any

    def as_json(self) -> dict[str, Any]:
        return {"transaction_id": self.transaction_id, "stripe_id": self.stripe_id, "kind": self.kind,
                "field": self.field, "ours": self.ours, "stripe": self.stripe}


@dataclass
class Summary:
    since: datetime
    until: datetime | None = None  # the periodic report leaves out what may still be in flight
    checked: int = 0
    differences: int = 0
    fields: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    complete: bool = True  # every transaction in the window was read

    def error(self, text: str) -> None:
        if len(self.errors) < _ERRORS_KEPT:
            self.errors.append(text)

    def as_json(self) -> dict[str, Any]:
        return {"since": self.since.astimezone(UTC).isoformat().replace("+00:00", "Z"), "checked": self.checked,
                "differences": self.differences, "fields": dict(self.fields), "complete": self.complete,
                "errors": self.errors,
                **({"until": self.until.astimezone(UTC).isoformat().replace("+00:00", "Z")} if self.until else {})}


def _plain(obj: Any) -> dict[str, Any]:
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj or {})


async def _read(api: StripeApi, stripe_id: str) -> dict[str, Any]:
    """The object as Stripe has it now (a PaymentIntent with its latest charge)."""
    if stripe_id.startswith("sub_"):
        return _plain(await api.retrieve_subscription(stripe_id))
    return _plain(await api.retrieve(stripe_id))


def stripe_side(obj: dict[str, Any]) -> dict[str, Any]:
    """The compared fields as Stripe's object says them, in our terms; a field Stripe's
    object does not tell is left out (not compared).  `status` None: the object has not
    settled (an open invoice), which any status of ours before success agrees with."""
    at = stripe_now()
    kind = obj.get("object")
    if kind == "subscription":
        change = subscription_meaning.change_of(obj, at)
        return {"status": change.status if change else obj.get("status"),
                "amount": subscription_meaning.price_of(obj)[0]}
    change = change_from_object(obj, at)
    side: dict[str, Any] = {"status": change.status if change else None, "stripe_status": obj.get("status")}
    if kind == "checkout.session":
        if isinstance(obj.get("amount_total"), int):
            side["amount"] = obj["amount_total"]
    elif kind == "payment_intent":
        if isinstance(obj.get("amount"), int):
            # After a partial capture ours is what was taken (changes/transitions.apply).
            taken = change.amount_captured if change is not None else None
            side["amount"] = taken if taken is not None and 0 < taken < obj["amount"] else obj["amount"]
        charge = obj.get("latest_charge")
        if isinstance(charge, dict):
            if isinstance(charge.get("amount_refunded"), int):
                side["amount_refunded"] = charge["amount_refunded"]
            if isinstance(charge.get("disputed"), bool):  # Stripe's; not every stand-in has it
                side["dispute"] = charge["disputed"]
                if charge["disputed"] and side["status"] in ("succeeded", "partially_refunded", "refunded"):
                    side["status"] = "disputed"  # ours stays disputed whatever follows
    return side


def _same_status(row: asyncpg.Record, side: dict[str, Any]) -> bool:
    ours, theirs = row["status"], side["status"]
    if theirs is None:  # not settled at Stripe (an open invoice): ours must not be either
        return ours in RANK and RANK[ours] < RANK["succeeded"]
    if row["kind"] == "checkout" and ours == "canceled" and theirs == "processing":
        # A session whose delayed payment failed stays complete and unpaid at Stripe
        # (payments/current.py): its failure event made it canceled here.
        return True
    return ours == theirs


def compare(row: asyncpg.Record, side: dict[str, Any]) -> list[Difference]:
    found = []

    def differ(name: str, ours: Any, theirs: Any) -> None:
        found.append(Difference(row["id"], row["stripe_id"], row["kind"], name, ours, theirs))

    if not _same_status(row, side):
        differ("status", row["status"], side["status"] or side.get("stripe_status"))
    if "amount" in side and side["amount"] != row["amount"]:
        differ("amount", row["amount"], side["amount"])
    if "amount_refunded" in side and side["amount_refunded"] != row["amount_refunded"]:
        differ("amount_refunded", row["amount_refunded"], side["amount_refunded"])
    if "dispute" in side and side["dispute"] != (row["dispute"] is not None):
        differ("dispute", row["dispute"] is not None, side["dispute"])
    return found


async def _touched(conn: asyncpg.Connection | asyncpg.Pool, since: datetime,
                   until: datetime | None) -> AsyncIterator[asyncpg.Record]:
    """Transactions linked to a Stripe object and moved at or after `since` (and before
    `until`), oldest first."""
    after: tuple[datetime, str] | None = None
    while True:
        rows = await conn.fetch(
            """SELECT id, stripe_id, kind, status, amount, amount_refunded, dispute, updated_at
                 FROM transactions
                WHERE stripe_id IS NOT NULL AND updated_at >= $1
                  AND ($5::timestamptz IS NULL OR updated_at < $5)
                  AND ($2::timestamptz IS NULL OR (updated_at, id) > ($2, $3))
                ORDER BY updated_at, id LIMIT $4""",
            since, after[0] if after else None, after[1] if after else "", _PAGE, until)
        for row in rows:
            yield row
        if len(rows) < _PAGE:
            return
        after = (rows[-1]["updated_at"], rows[-1]["id"])


async def report(conn: asyncpg.Connection | asyncpg.Pool, api: StripeApi, summary: Summary,
                 pace: float = 0.0) -> AsyncIterator[Difference]:
    """Each difference of each transaction touched since summary.since; summary counts as
    it goes.  Stripe unavailable (5xx, breaker open, budget spent) ends the report early,
    incomplete, with the reason in summary.errors.  `pace`: seconds between reads, so a
    background report leaves the budget to the calls customers wait on."""
    async for row in _touched(conn, summary.since, summary.until):
        try:
            obj = await _read(api, row["stripe_id"])
        except StripeFailure as failure:
            if failure.status >= 500:
                summary.complete = False
                summary.error(f"stopped at {row['id']}: {failure.message}")
                return
            # A read by id is refused when Stripe has no such object: ours names one.
            summary.checked += 1
            difference = Difference(row["id"], row["stripe_id"], row["kind"], "status", row["status"], None)
            summary.differences += 1
            summary.fields["status"] += 1
            summary.error(f"{row['stripe_id']}: {failure.message}")
            yield difference
            continue
        summary.checked += 1
        for difference in compare(row, stripe_side(obj)):
            summary.differences += 1
            summary.fields[difference.field] += 1
            yield difference
        if pace:
            await asyncio.sleep(pace)  # pacing Stripe reads, not waiting for anything


# --- the periodic report in every server -------------------------------------------------


async def _last_run(conn: asyncpg.Connection) -> dict[str, Any] | None:
    value = await conn.fetchval("SELECT value::text FROM paystream_config WHERE key = $1", CONFIG_KEY)
    return json.loads(value) if value else None


async def _record(conn: asyncpg.Connection, value: dict[str, Any]) -> None:
    await conn.execute(
        """INSERT INTO paystream_config (key, value) VALUES ($1, $2::text::jsonb)
           ON CONFLICT (key) DO UPDATE SET value = excluded.value, recorded_at = clock_timestamp()""",
        CONFIG_KEY, json.dumps(value))


async def run_due(pool: asyncpg.Pool, api: StripeApi, interval: float, pace: float = 0.0) -> float:
    """Run the report if no process on this database ran one in the last `interval`
    seconds and none is running; seconds until the next is due.  The lock is held by a
    transaction on one pooled connection for the pass (no session state: pooler-safe),
    which records the run when it commits."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK):
            return min(interval, 60.0)  # another process is reporting: look again later
        now = await conn.fetchval("SELECT clock_timestamp()")
        last = await _last_run(conn)
        if last is None or "next_since" not in last:
            # A new deployment: its first report is one interval from now, over that
            # interval (no Stripe reads at every first start, e.g. of each test database).
            await _record(conn, {"ran_at": now.isoformat(), "next_since": now.isoformat()})
            return interval
        due = datetime.fromisoformat(last["ran_at"]) + timedelta(seconds=interval)
        if due > now:
            return (due - now).total_seconds()
        # What moved in the last moments may have its webhook still on the way (Stripe's
        # arrive seconds late): the next report reads it.
        until = now - timedelta(seconds=min(IN_FLIGHT_SECONDS, interval))
        summary = Summary(datetime.fromisoformat(last["next_since"]), until)
        async for difference in report(conn, api, summary, pace):
            metrics.RECONCILE_DIFFERENCES.labels(difference.field).inc()
            log.warning("reconcile: %s %s differs from Stripe: ours %s, Stripe's %s", difference.transaction_id,
                        difference.field, json.dumps(difference.ours), json.dumps(difference.stripe),
                        extra={"transaction_id": difference.transaction_id, "stripe_id": difference.stripe_id})
        if summary.complete:
            record = {"ran_at": now.isoformat(), "next_since": until.isoformat()}
        else:  # due again at once (the loop looks within a minute), over this window again
            record = {"ran_at": last["ran_at"], "next_since": last["next_since"]}
        await _record(conn, {**record, "finished_at": datetime.now(UTC).isoformat(), "last": summary.as_json()})
    result = "incomplete" if not summary.complete else "differences" if summary.differences else "clean"
    metrics.RECONCILE_RUNS.labels(result).inc()
    metrics.RECONCILE_LAST_RUN.set(time.time())
    log.info("reconcile report: %d checked since %s, %d differences%s", summary.checked, summary.as_json()["since"],
             summary.differences, "" if summary.complete else f"; incomplete: {'; '.join(summary.errors[-1:])}")
    return interval if summary.complete else min(interval, 60.0)


class Reconciler(BackgroundTask):
    """The periodic report (PAYSTREAM_RECONCILE_INTERVAL seconds; the app starts it only
    when that is above 0)."""

    task_name = "paystream-reconcile"

    def __init__(self, pool: asyncpg.Pool, api: StripeApi, interval: float, pace: float = 0.0) -> None:
        self.pool, self.api, self.interval, self.pace = pool, api, interval, pace

    async def _forever(self) -> None:
        while True:
            wait = min(self.interval, 60.0)
            try:
                wait = await run_due(self.pool, self.api, self.interval, self.pace)
            except asyncpg.UndefinedTableError:
                pass  # not migrated yet: /readyz says so; look again later
            except DATABASE_ERRORS as exc:
                log.warning("reconcile report failed: %s", exc)
            except Exception:
                log.exception("reconcile report failed")
            await asyncio.sleep(max(0.05, wait))  # until the next report is due
