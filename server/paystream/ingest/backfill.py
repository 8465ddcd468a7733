"""Backfill from Stripe's event log: apply every event Stripe keeps (30 days, `GET
/v1/events`) that never reached the webhook, through the webhook's own path (same
storage, idempotency, order rules and effects), so a lost or never-sent delivery is
recovered.  `paystream backfill` runs it once; every server process runs it at start-up
and every PAYSTREAM_BACKFILL_INTERVAL, one process at a time (an advisory lock)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from paystream.background import BackgroundTask
from paystream.db import ACQUIRE_TIMEOUT, DATABASE_DOWN, DATABASE_ERRORS
from paystream.ingest.stripe_events import MalformedEvent, check_envelope, is_supported
from paystream.ingest.webhooks import apply_event
from paystream.payments.stripe_api import StripeApi, StripeFailure

log = logging.getLogger("paystream.backfill")

_LOCK = 7_400_002  # one backfill at a time across every process on the database
# Stripe delivers late and out of order: read back this far before the newest event we hold.
MARGIN_SECONDS = 3600
RETENTION_SECONDS = 30 * 86400  # what Stripe keeps
_HEADERS = {"user-agent": "paystream backfill"}


@dataclass
class BackfillReport:
    since: int = 0
    listed: int = 0
    applied: dict[str, int] = field(default_factory=dict)  # outcome -> count
    skipped: int = 0  # unsupported types, or not a Stripe event
    errors: list[str] = field(default_factory=list)
    ran: bool = True  # False: another process held the lock

    def as_json(self) -> dict[str, Any]:
        return {"ran": self.ran, "since": self.since, "listed": self.listed, "applied": self.applied,
                "skipped": self.skipped, "errors": self.errors}


async def default_since(pool: asyncpg.Pool) -> int:
    newest = await pool.fetchval("SELECT extract(epoch FROM max(created))::bigint FROM stripe_events")
    now = int(time.time())
    return max(now - RETENTION_SECONDS, (newest - MARGIN_SECONDS) if newest else now - RETENTION_SECONDS)


async def backfill(pool: asyncpg.Pool, api: StripeApi, since: int | None = None) -> BackfillReport:
    """List events created since `since` (default: the newest stored minus a margin) and
    apply, oldest first, each one not stored yet."""
    report = BackfillReport()
    # A transaction-scoped lock, held by a transaction open around the whole pass: a
    # session lock taken through a transaction-mode pooler (PAYSTREAM_DB_POOLER) would stay
    # on whichever server session ran it, its unlock going to another.  The open
    # transaction pins one pooled connection for the pass and holds no snapshot between
    # statements (read committed, no writes on it); the events are applied on other ones.
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as lock_conn, lock_conn.transaction():
        if not await lock_conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK):
            report.ran = False
            return report
        report.since = since if since is not None else await default_since(pool)
        events: list[dict[str, Any]] = []
        try:
            async for event in api.list_events(report.since):
                events.append(event)
        except StripeFailure as failure:
            report.errors.append(f"list events: {failure.message}")
        report.listed = len(events)
        stored = {r["id"] for r in await pool.fetch(
            "SELECT id FROM stripe_events WHERE id = ANY($1::text[])", [e.get("id") for e in events])}
        # Stripe lists newest first; apply in the order they happened.  `created` has whole
        # seconds: reversed first, the stable sort keeps events of one second oldest first.
        for event in sorted(reversed(events), key=lambda e: (e.get("created") or 0)):
            if event.get("id") in stored:
                continue
            try:
                check_envelope(event)
            except MalformedEvent as exc:
                report.skipped += 1
                report.errors.append(f"{str(event.get('id'))[:60]}: {exc}")
                continue
            if not is_supported(event["type"]):
                report.skipped += 1
                continue
            try:
                outcome = await apply_event(pool, event, json.dumps(event), _HEADERS)
            except DATABASE_DOWN:
                raise  # nothing can be stored now: the next pass tries again
            except Exception as exc:  # kept as failed by apply_event, as a webhook's would be
                outcome = "failed"
                report.errors.append(f"{event['id']}: {type(exc).__name__}: {exc}")
            report.applied[outcome] = report.applied.get(outcome, 0) + 1
            log.info("backfilled %s: %s", event["type"], outcome,
                     extra={"stripe_event_id": event["id"], "event_type": event["type"]})
    if report.applied or report.errors:
        log.info("backfill: %s", json.dumps(report.as_json()))
    return report


class Backfiller(BackgroundTask):
    """Runs backfill at start-up and then every `interval` seconds in the background."""

    task_name = "paystream-backfill"

    def __init__(self, pool: asyncpg.Pool, api: StripeApi, interval: float) -> None:
        self.pool, self.api, self.interval = pool, api, interval

    async def _forever(self) -> None:
        while True:
            try:
                await backfill(self.pool, self.api)
            except DATABASE_ERRORS as exc:
                log.warning("backfill pass failed: %s", exc)
            except Exception:
                log.exception("backfill pass failed")
            await asyncio.sleep(self.interval)
