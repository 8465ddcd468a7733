"""Calls to Stripe that committed changes asked for (the outbox), and the sweeper that
re-checks transactions Stripe's webhooks left stuck and releases authorisations held past
their transaction's authorization_days.  Both record what they did as events with a
`cause` and push them like any other change.  Each pass of the server's loop also
counts the transactions still unsettled past stuck_after (paystream_transactions_stuck)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import timedelta

import asyncpg

from paystream.background import BackgroundTask
from paystream.changes import store, transitions
from paystream.changes.lifecycle import stripe_now
from paystream.db import ACQUIRE_TIMEOUT, DATABASE_ERRORS
from paystream.ops import metrics
from paystream.payments import refunds, subscriptions
from paystream.payments.current import apply_read, change_from_payment_intent, read
from paystream.payments.stripe_api import StripeApi, StripeFailure

log = logging.getLogger("paystream.recovery")

# Days an authorisation is held when its transaction names none (created before
# authorization_days existed, or a card validation, which releases its own at once).
DEFAULT_AUTHORIZATION_DAYS = 7
SWEEP_READS = 100  # Stripe reads per sweep pass, at most (its live rate limit is 100/s)


@dataclass
class Report:
    outbox_done: int = 0
    outbox_failed: int = 0
    checked: int = 0
    moved: int = 0
    expiring: int = 0
    parked_expired: int = 0
    refunds_settled: int = 0
    stuck: int = 0
    errors: list[str] = field(default_factory=list)


class Recovery(BackgroundTask):
    task_name = "paystream-recovery"

    def __init__(self, pool: asyncpg.Pool, api: StripeApi, *, stuck_after: timedelta = timedelta(minutes=15),
                 interval: float = 60.0, parked_expiry: timedelta = timedelta(days=1)) -> None:
        self.pool, self.api = pool, api
        self.stuck_after, self.interval = stuck_after, interval
        self.parked_expiry = parked_expiry
        self._kick = asyncio.Event()
        self._stuck_statuses: set[str] = set()

    def kick(self, *_: object) -> None:
        """Run the outbox now (a change just asked for a Stripe call)."""
        self._kick.set()

    async def _forever(self) -> None:
        last_sweep = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.interval)
            self._kick.clear()
            try:
                report = Report()
                await self.run_outbox(report)
                loop_now = asyncio.get_running_loop().time()
                if loop_now - last_sweep >= self.interval:
                    last_sweep = loop_now
                    await self.sweep(report)
                    await self.count_stuck(report)
            except DATABASE_ERRORS as exc:
                log.warning("recovery pass failed: %s", exc)

    # --- the outbox ---------------------------------------------------------------------

    async def run_outbox(self, report: Report) -> Report:
        while True:
            async with self.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
                job = await conn.fetchrow(
                    """UPDATE outbox SET attempts = attempts + 1
                        WHERE id = (SELECT id FROM outbox WHERE done_at IS NULL AND attempts < 20
                                     ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1)
                    RETURNING id, kind, transaction_id, attempts""")
            if job is None:
                return report
            try:
                await self._release(job)
                report.outbox_done += 1
            except StripeFailure as failure:
                report.outbox_failed += 1
                report.errors.append(f"{job['kind']} {job['transaction_id']}: {failure.message}")
                await self.pool.execute("UPDATE outbox SET last_error = $2 WHERE id = $1", job["id"], failure.message)
                if failure.status >= 500:
                    return report  # Stripe is down: try again on the next pass

    async def _release(self, job: asyncpg.Record) -> None:
        if job["kind"] == "read_subscription":  # a change asked what Stripe says now
            await subscriptions.apply_read(self.pool, self.api, job)
            return
        row = await store.get_transaction(self.pool, job["transaction_id"])
        assert row is not None and row["stripe_id"]
        reason = "validation" if job["kind"] == "cancel_validation" else "expired"
        try:
            pi = await self.api.cancel_payment_intent(row["id"], row["stripe_id"], reason)
        except StripeFailure as failure:
            if failure.status >= 500:
                raise
            pi = await self.api.retrieve_payment_intent(row["stripe_id"])  # already canceled, say
        cause = ("paystream.card_validation.released" if reason == "validation"
                 else "paystream.authorization.expired")
        async with self.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
            locked = await store.lock_by_id(conn, row["id"])
            change = change_from_payment_intent(pi, stripe_now())
            if change is not None:
                await transitions.apply(conn, locked, change, stripe_event_id=None, cause_type=cause)
            await conn.execute("UPDATE outbox SET done_at = clock_timestamp(), last_error = NULL WHERE id = $1",
                               job["id"])
        log.info("%s done", job["kind"], extra={"transaction_id": row["id"]})

    # --- the sweeper --------------------------------------------------------------------

    async def sweep(self, report: Report, only: list[str] | None = None) -> Report:
        """Re-read from Stripe every transaction that has not reached success and has had no
        news (nor a read) for stuck_after, whatever its kind and status (or just `only`, by
        txn_ or Stripe id), at most SWEEP_READS per pass, the longest-quiet first.  A
        transaction quiet for long is read ever more rarely (after a quarter of its age):
        an abandoned checkout costs a few reads, not one a pass.  After success, refunds
        and disputes come from the webhook and the backfill."""
        # Unsettled: a payment-like kind before success (PaymentIntents, invoices,
        # SetupIntents, Checkout Sessions), or a subscription still incomplete.  Two
        # queries, each on its own partial index.
        quiet = """greatest(updated_at, checked_at) < clock_timestamp()
                      - greatest($1::interval, (clock_timestamp() - created_at) / 4)
                  AND ($2::text[] IS NULL OR id = ANY($2) OR stripe_id = ANY($2))"""
        stuck = await self.pool.fetch(
            f"""(SELECT id, stripe_id, greatest(updated_at, checked_at) AS quiet_since FROM transactions
                 WHERE paystream_status_rank(status) < 5 AND stripe_id IS NOT NULL
                   AND (stripe_id LIKE 'pi\\_%' OR stripe_id LIKE 'in\\_%' OR stripe_id LIKE 'seti\\_%'
                        OR stripe_id LIKE 'cs\\_%')
                   AND {quiet} ORDER BY greatest(updated_at, checked_at) LIMIT $3)
                UNION ALL
                (SELECT id, stripe_id, greatest(updated_at, checked_at) FROM transactions
                  WHERE kind = 'subscription' AND status = 'incomplete' AND stripe_id IS NOT NULL
                    AND {quiet} ORDER BY greatest(updated_at, checked_at) LIMIT $3)
                ORDER BY quiet_since LIMIT $3""", self.stuck_after, only, SWEEP_READS)
        for row in stuck:
            report.checked += 1
            try:
                now = await read(self.api, self.pool, row["stripe_id"], stripe_now())
            except StripeFailure as failure:
                report.errors.append(f"retrieve {row['stripe_id']}: {failure.message}")
                if failure.status >= 500:
                    break
                continue
            async with self.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
                locked = await store.lock_by_id(conn, row["id"])
                moved, _ = await apply_read(conn, locked, now, "paystream.reconcile")
                report.moved += int(moved)
                await conn.execute("UPDATE transactions SET checked_at = clock_timestamp() WHERE id = $1", row["id"])
        # Held since it reached requires_capture (updated_at: nothing else moves it there).
        expiring = await self.pool.fetch(
            """INSERT INTO outbox (kind, transaction_id)
               SELECT 'expire_authorization', id FROM transactions
                WHERE status = 'requires_capture' AND stripe_id LIKE 'pi\\_%'
                  AND updated_at < clock_timestamp() - make_interval(days => coalesce(authorization_days, $1))
                  AND ($2::text[] IS NULL OR id = ANY($2) OR stripe_id = ANY($2))
               ON CONFLICT DO NOTHING RETURNING id""", DEFAULT_AUTHORIZATION_DAYS, only)
        report.expiring = len(expiring)
        if expiring:
            await self.run_outbox(report)
        if only is None:
            moved, errors = await refunds.retry_pending(self.pool, self.api)
            report.refunds_settled += moved
            report.errors.extend(errors)
        await self.expire_parked(report)
        return report

    async def count_stuck(self, report: Report) -> Report:
        """Set paystream_transactions_stuck{status}: transactions linked to Stripe that have
        not settled (not succeeded, canceled or after) and have not moved for stuck_after,
        database-wide, after this pass's reads.  The sweeper keeps re-reading them; an
        alert (docs/alerts.yml) says when some stay."""
        rows = await self.pool.fetch(
            """SELECT status, count(*) AS n FROM transactions
                WHERE paystream_status_rank(status) < 5 AND stripe_id IS NOT NULL
                  AND updated_at < clock_timestamp() - $1::interval
                GROUP BY status""", self.stuck_after)
        counts = {r["status"]: r["n"] for r in rows}
        # A status counted before and not now reads 0, not its last count.
        for status in self._stuck_statuses | set(counts):
            metrics.TRANSACTIONS_STUCK.labels(status).set(counts.get(status, 0))
        self._stuck_statuses |= set(counts)
        report.stuck = sum(counts.values())
        return report

    # --- parked events --------------------------------------------------------------------

    async def expire_parked(self, report: Report) -> Report:
        """Events parked for a transaction that was never written, for longer than
        parked_expiry (PAYSTREAM_PARKED_EXPIRY), end with outcome `expired`: listed by
        `paystream events expired`, counted, applied to nothing.  Each takes the lock the
        transaction's writer takes (transitions.lock_for_writing), so an event is either
        applied by its transaction or expired, never both, never neither."""
        candidates = await self.pool.fetch(
            """SELECT p.stripe_event_id, p.transaction_id FROM parked_events p
                 JOIN stripe_events s ON s.id = p.stripe_event_id
                WHERE coalesce(s.first_received_at, s.received_at) < clock_timestamp() - $1::interval
                ORDER BY coalesce(s.first_received_at, s.received_at) LIMIT 1000""", self.parked_expiry)
        for candidate in candidates:
            async with self.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
                await transitions.lock_for_writing(conn, candidate["transaction_id"])
                expired = await conn.fetchval(
                    """WITH gone AS (
                         DELETE FROM parked_events p
                          WHERE p.stripe_event_id = $1
                            AND NOT EXISTS (SELECT FROM transactions t WHERE t.id = p.transaction_id)
                         RETURNING p.stripe_event_id)
                       UPDATE stripe_events SET outcome = 'expired', processed_at = clock_timestamp(),
                              error = $2
                        WHERE id IN (SELECT stripe_event_id FROM gone)
                       RETURNING 1""",
                    candidate["stripe_event_id"],
                    f"parked for {candidate['transaction_id']}, which was never written, "
                    f"for longer than {self.parked_expiry}")
            if expired:
                report.parked_expired += 1
                metrics.PARKED_EXPIRED.inc()
                log.warning("parked event expired: %s was never written", candidate["transaction_id"],
                            extra={"stripe_event_id": candidate["stripe_event_id"],
                                   "transaction_id": candidate["transaction_id"]})
        return report
