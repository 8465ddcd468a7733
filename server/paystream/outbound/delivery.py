"""Signed webhooks to the merchant's backend: the worker that sends what the `outbound`
effect queued (paystream.effects.outbound), and the queries `paystream deliveries` runs.

Each logged event becomes one Standard Webhooks message, POSTed to PAYSTREAM_OUTBOUND_URL:

    webhook-id: msg_<transaction ulid>_<seq>      the same on every attempt and replay
    webhook-timestamp: <this attempt's unix time>
    webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">  (the standardwebhooks library)
    {"type": "transaction.<status>", "timestamp": "<when it was logged>", "data": <the pushed event>}

- At least once: a row stays pending until a 2xx answer is recorded.  Every server process
  delivers: a worker claims the earliest due row with FOR UPDATE SKIP LOCKED and holds the
  row lock while it POSTs, so no two processes send one message at once, and a process
  killed mid-delivery releases the lock with its connection: another process (or the
  restarted one) sends it again at once.  The lock is held on a pool of the deliverer's
  own (PAYSTREAM_OUTBOUND_CONCURRENCY connections), so a slow backend never takes the
  connections webhooks need.
- In seq order per transaction: only the lowest pending row of a transaction is due; the
  worker that delivers it, or gives up on it, makes the next one due in the same database
  transaction (see db/migrations/006_outbound_deliveries.sql).
- A 2xx within TIMEOUT seconds is success; any other status, a timeout or a connection error
  is a retry after RETRY_DELAYS (each jittered by ±JITTER, all multiplied by
  PAYSTREAM_OUTBOUND_BACKOFF_SCALE).  After the last one the row is marked failed and the
  next event of its transaction goes ahead; `paystream deliveries --replay` queues it again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import asyncpg
import httpx
from standardwebhooks import Webhook

from paystream import __version__, db
from paystream.changes.store import timestamp
from paystream.effects.outbound import OUTBOUND_CHANNEL
from paystream.ops import metrics

if TYPE_CHECKING:
    from paystream.config import Settings

log = logging.getLogger("paystream.outbound")

# Seconds to wait after failed attempt 1, 2, …: 5 s, 30 s, 2 min, 10 min, 30 min, 1 h, 2 h,
# 4 h, 8 h, 8 h, 8 h.  Twelve attempts over 31.7 h nominal; with the jitter at its lowest
# (x0.8) the last attempt still comes 25.4 h after the first, so a backend is retried for
# more than 24 h whatever the dice say.
RETRY_DELAYS = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 28800, 28800)
ATTEMPTS = 1 + len(RETRY_DELAYS)
JITTER = 0.2
TIMEOUT = 10.0          # seconds for the whole attempt: connect, send, answer
IDLE_RECHECK = 30.0     # an idle worker looks again this often even if nothing woke it
STATS_EVERY = 5.0       # the pending / failed gauges are refreshed this often
SAFETY_EVERY = 60.0     # and a missed hand-over to a transaction's next event is looked for
ERROR_SNIPPET = 200     # bytes of a refusing answer's body kept in last_error
MIN_SECRET_BYTES = 16


def retry_delay(attempts: int, scale: float = 1.0, rng: random.Random | None = None) -> float | None:
    """Seconds until the next try after `attempts` failed ones; None when the schedule is over."""
    if attempts >= ATTEMPTS:
        return None
    return RETRY_DELAYS[attempts - 1] * scale * (rng or random).uniform(1 - JITTER, 1 + JITTER)


def message_body(status: str, logged_at: datetime, data: str) -> str:
    """The message: the pushed event's JSON text (as logged, byte for byte) wrapped in the
    Standard Webhooks envelope."""
    return (f'{{"type":{json.dumps("transaction." + status)},'
            f'"timestamp":"{timestamp(logged_at)}","data":{data}}}')


def secret_problem(secret: str) -> str | None:
    raw = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not secret.startswith("whsec_") or len(key) < MIN_SECRET_BYTES:
        return (f"PAYSTREAM_OUTBOUND_SECRET is not a Standard Webhooks secret "
                f"(whsec_ followed by the base64 of at least {MIN_SECRET_BYTES} random bytes)")
    return None


def config_problem(settings: Settings) -> str | None:
    """Why the outbound settings cannot work (one line naming the variable, never its
    value), or None when they are fine or unset."""
    url, secret = settings.outbound_url, settings.outbound_secret
    if not url and not secret:
        return None
    if not url:
        return "PAYSTREAM_OUTBOUND_SECRET is set but PAYSTREAM_OUTBOUND_URL is not"
    if not secret:
        return "PAYSTREAM_OUTBOUND_URL is set but PAYSTREAM_OUTBOUND_SECRET is not"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "PAYSTREAM_OUTBOUND_URL is not an http:// or https:// URL"
    return secret_problem(secret)


class Signer:
    """Standard Webhooks headers for a message, signed by the standardwebhooks library."""

    def __init__(self, secret: str) -> None:
        self._webhook = Webhook(secret)

    def headers(self, webhook_id: str, body: str, now: datetime | None = None) -> dict[str, str]:
        now = (now or datetime.now(UTC)).replace(microsecond=0)
        return {
            "content-type": "application/json",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self._webhook.sign(webhook_id, now, body),
        }


@dataclass(frozen=True, slots=True)
class Attempt:
    status: int | None   # the HTTP status, None when there was no answer
    error: str | None    # None on success

    @property
    def ok(self) -> bool:
        return self.error is None


def _pending(alias: str = "") -> str:
    """The rows still to be sent (neither delivered nor given up)."""
    a = f"{alias}." if alias else ""
    return f"{a}delivered_at IS NULL AND {a}failed_at IS NULL"


_PENDING = _pending()

# The earliest due (or next to be due) row no other worker holds, with its log row.
_CLAIM = f"""
    SELECT d.id, d.webhook_id, d.transaction_id, d.seq, d.attempts, e.status,
           e.created_at AS logged_at, e.data::text AS data,
           greatest(extract(epoch FROM d.next_attempt_at - clock_timestamp()), 0)::float8 AS wait
      FROM outbound_deliveries d JOIN transaction_events e USING (transaction_id, seq)
     WHERE {_pending('d')} AND d.next_attempt_at IS NOT NULL
     ORDER BY d.next_attempt_at
     LIMIT 1
       FOR UPDATE OF d SKIP LOCKED"""

# After a row is delivered or given up: its transaction's next pending row becomes due.  The
# caller first takes a share lock on the transaction's row, which waits for a webhook that
# is logging (and queuing) an event for it, so that row is seen here; and a webhook that
# comes after sees this row done and queues its event as due at once.
_HAND_OVER = f"""
    UPDATE outbound_deliveries SET next_attempt_at = clock_timestamp()
     WHERE id = (SELECT id FROM outbound_deliveries WHERE transaction_id = $1 AND {_PENDING}
                  ORDER BY seq LIMIT 1)
       AND next_attempt_at IS NULL"""


class Deliverer:
    """Sends queued messages: `concurrency` workers in this process, woken by the
    `paystream_outbound` notification (a new row, a replay) and by their own timers for
    retries that come due."""

    def __init__(self, pool: asyncpg.Pool, dsn: str, *, url: str, secret: str, backoff_scale: float = 1.0,
                 concurrency: int = 4, timeout: float = TIMEOUT) -> None:
        self.pool, self.dsn, self.url = pool, dsn, url
        self.signer = Signer(secret)
        self.scale, self.concurrency, self.timeout = backoff_scale, concurrency, timeout
        self._rng = random.Random()
        self._own: asyncpg.Pool | None = None
        self._http: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._idle: list[asyncio.Future[None]] = []
        self._kicked = False
        self._stopping = False

    @classmethod
    def from_settings(cls, pool: asyncpg.Pool, dsn: str, settings: Settings) -> Deliverer | None:
        """The deliverer the settings ask for; None when outbound webhooks are not set up."""
        problem = config_problem(settings)
        if problem:
            raise RuntimeError(problem)
        if not settings.outbound_url or not settings.outbound_secret:
            return None
        return cls(pool, dsn, url=settings.outbound_url, secret=settings.outbound_secret,
                   backoff_scale=settings.outbound_backoff_scale, concurrency=settings.outbound_concurrency)

    # --- waking -------------------------------------------------------------------------

    def kick(self, *_: object) -> None:
        """Something was queued (or replayed): wake one idle worker, or make the next one to
        go idle look again first."""
        if not self._wake_one():
            self._kicked = True

    def _wake_one(self) -> bool:
        while self._idle:
            waiter = self._idle.pop()
            if not waiter.done():
                waiter.set_result(None)
                return True
        return False

    async def _rest(self, seconds: float) -> None:
        if self._kicked or self._stopping:
            self._kicked = False
            return
        waiter = asyncio.get_running_loop().create_future()
        self._idle.append(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, min(seconds, IDLE_RECHECK))
        finally:
            if waiter in self._idle:
                self._idle.remove(waiter)

    # --- life -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._own = await db.create_pool(self.dsn, self.concurrency)
        self._http = httpx.AsyncClient(
            timeout=self.timeout, follow_redirects=False,  # a redirect is not a 2xx: retried
            headers={"user-agent": f"paystream/{__version__}"},
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency))
        self._tasks = [asyncio.create_task(self._work(), name=f"paystream-outbound-{k}")
                       for k in range(self.concurrency)]
        self._tasks.append(asyncio.create_task(self._watch(), name="paystream-outbound-stats"))
        host = urlsplit(self.url).hostname
        log.info("outbound webhooks to %s (%d at a time)", host, self.concurrency)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop claiming; give the attempts in flight `grace` seconds, then cancel them (a
        canceled attempt's row is released unchanged and sent again later)."""
        self._stopping = True
        while self._wake_one():
            pass
        workers, watcher = self._tasks[:-1], self._tasks[-1:]
        for task in watcher:
            task.cancel()
        if workers:
            _done, late = await asyncio.wait(workers, timeout=grace)
            for task in late:
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._http is not None:
            await self._http.aclose()
        if self._own is not None:
            try:
                await asyncio.wait_for(self._own.close(), 5)
            except TimeoutError:
                self._own.terminate()

    async def _work(self) -> None:
        streak, backoff = 0, 0.5
        while not self._stopping:
            try:
                wait = await self.deliver_one()
                backoff = 0.5
            except Exception as exc:  # the database is away, or a bug: log it, keep the worker
                if isinstance(exc, db.DATABASE_ERRORS):
                    log.warning("outbound delivery failed: %s", exc)
                else:
                    log.exception("outbound delivery failed")
                wait, backoff = backoff * self._rng.uniform(0.5, 1.5), min(backoff * 2, IDLE_RECHECK)
            if wait == 0.0:
                streak += 1
                if streak >= 2:
                    self._wake_one()  # a backlog: bring in another worker
                continue
            streak = 0
            await self._rest(IDLE_RECHECK if wait is None else wait)

    async def _watch(self) -> None:
        """Refresh the gauges, and once a minute make sure no transaction's next event was
        left waiting behind one that is done (there is no known way for that to happen)."""
        last_safety = 0.0
        while True:
            try:
                await refresh_gauges(self.pool)
                now = asyncio.get_running_loop().time()
                if now - last_safety >= SAFETY_EVERY:
                    last_safety = now
                    woken = await self.pool.fetch(
                        f"""UPDATE outbound_deliveries d SET next_attempt_at = clock_timestamp()
                             WHERE {_pending('d')} AND d.next_attempt_at IS NULL
                               AND NOT EXISTS (SELECT FROM outbound_deliveries p
                                                WHERE p.transaction_id = d.transaction_id AND p.seq < d.seq
                                                  AND {_pending('p')})
                         RETURNING d.id""")
                    if woken:
                        log.warning("outbound: %d deliveries were waiting for nothing; sent now", len(woken))
                        self.kick()
            except db.DATABASE_ERRORS as exc:
                log.debug("outbound gauges not refreshed: %s", exc)
            await asyncio.sleep(STATS_EVERY)

    # --- one delivery -----------------------------------------------------------------------

    async def deliver_one(self) -> float | None:
        """Send the earliest due message, if one is due: 0.0.  Else the seconds until one
        is due, or None if nothing is pending."""
        assert self._own is not None
        async with self._own.acquire(timeout=db.ACQUIRE_TIMEOUT) as conn, conn.transaction():
            job = await conn.fetchrow(_CLAIM)
            if job is None:
                return None
            if job["wait"] > 0:
                return job["wait"]
            attempt = await self.post(job["webhook_id"], message_body(job["status"], job["logged_at"], job["data"]))
            await self._record(conn, job, attempt)
        return 0.0

    async def post(self, webhook_id: str, body: str) -> Attempt:
        """One attempt: a 2xx within `timeout` seconds, or why not."""
        assert self._http is not None
        headers = self.signer.headers(webhook_id, body)
        try:
            async with asyncio.timeout(self.timeout):
                async with self._http.stream("POST", self.url, content=body.encode(), headers=headers) as resp:
                    if resp.is_success:
                        return Attempt(resp.status_code, None)
                    snippet = b""
                    async for chunk in resp.aiter_bytes():
                        snippet += chunk
                        if len(snippet) >= ERROR_SNIPPET:
                            break
                    text = snippet[:ERROR_SNIPPET].decode("utf-8", "replace").replace("\x00", "").strip()
                    return Attempt(resp.status_code, f"HTTP {resp.status_code}" + (f": {text}" if text else ""))
        except TimeoutError:
            return Attempt(None, f"no answer within {self.timeout:g} s")
        except (httpx.HTTPError, OSError) as exc:
            return Attempt(None, f"{type(exc).__name__}: {exc}"[:500].replace("\x00", ""))

    async def _record(self, conn: asyncpg.Connection, job: asyncpg.Record, attempt: Attempt) -> None:
        attempts = job["attempts"] + 1
        extra = {"transaction_id": job["transaction_id"]}
        if attempt.ok:
            latency = await conn.fetchval(
                """UPDATE outbound_deliveries
                      SET attempts = $2, last_attempt_at = clock_timestamp(), delivered_at = clock_timestamp(),
                          next_attempt_at = NULL, last_status = $3, last_error = NULL
                    WHERE id = $1
                RETURNING extract(epoch FROM clock_timestamp() - queued_at)::float8""",
                job["id"], attempts, attempt.status)
            metrics.OUTBOUND_ATTEMPTS.labels("delivered").inc()
            metrics.OUTBOUND_LATENCY.observe(latency)
            done = True
        else:
            delay = retry_delay(attempts, self.scale, self._rng)
            await conn.execute(
                """UPDATE outbound_deliveries
                      SET attempts = $2, last_attempt_at = clock_timestamp(), last_status = $3, last_error = $4,
                          next_attempt_at = CASE WHEN $5::float8 IS NULL THEN NULL
                                                 ELSE clock_timestamp() + make_interval(secs => $5) END,
                          failed_at = CASE WHEN $5::float8 IS NULL THEN clock_timestamp() END
                    WHERE id = $1""",
                job["id"], attempts, attempt.status, attempt.error, delay)
            done = delay is None
            if done:
                metrics.OUTBOUND_ATTEMPTS.labels("failed").inc()
                log.warning("outbound %s failed after %d attempts: %s", job["webhook_id"], attempts,
                            attempt.error, extra=extra)
            else:
                metrics.OUTBOUND_ATTEMPTS.labels("retry").inc()
                log.info("outbound %s attempt %d: %s; next in %.3g s", job["webhook_id"], attempts,
                         attempt.error, delay, extra=extra)
        if done:
            await conn.execute("SELECT FROM transactions WHERE id = $1 FOR SHARE", job["transaction_id"])
            await conn.execute(_HAND_OVER, job["transaction_id"])


async def refresh_gauges(pool: asyncpg.Pool | asyncpg.Connection) -> None:
    row = await pool.fetchrow(
        f"""SELECT (SELECT count(*) FROM outbound_deliveries WHERE {_PENDING}) AS pending,
                   (SELECT count(*) FROM outbound_deliveries WHERE failed_at IS NOT NULL) AS failed,
                   (SELECT coalesce(extract(epoch FROM clock_timestamp() - min(queued_at)), 0)::float8
                      FROM outbound_deliveries WHERE {_PENDING}) AS oldest""")
    metrics.OUTBOUND_PENDING.set(row["pending"])
    metrics.OUTBOUND_FAILED.set(row["failed"])
    metrics.OUTBOUND_OLDEST.set(row["oldest"])


# --- `paystream deliveries` ----------------------------------------------------------------

WHICH = {
    "pending": f"{_pending('d')}",
    "failed": "d.failed_at IS NOT NULL",
    "delivered": "d.delivered_at IS NOT NULL",
    "all": "true",
}

_LISTED = """
    SELECT d.id, d.webhook_id, d.transaction_id, d.seq, 'transaction.' || e.status AS type,
           CASE WHEN d.delivered_at IS NOT NULL THEN 'delivered'
                WHEN d.failed_at IS NOT NULL THEN 'failed' ELSE 'pending' END AS state,
           d.attempts, d.last_status, d.last_error, d.queued_at, d.next_attempt_at, d.last_attempt_at,
           d.delivered_at, d.failed_at, d.created_at
      FROM outbound_deliveries d JOIN transaction_events e USING (transaction_id, seq)"""


def _plain(row: asyncpg.Record) -> dict[str, Any]:
    return {k: (timestamp(v) if isinstance(v, datetime) else v) for k, v in row.items()}


async def listing(pool: asyncpg.Pool, which: str, limit: int) -> list[dict[str, Any]]:
    """Deliveries in state `which` (pending, failed, delivered, all), newest first."""
    rows = await pool.fetch(f"{_LISTED} WHERE {WHICH[which]} ORDER BY d.id DESC LIMIT $1", limit)
    return [_plain(r) for r in rows]


async def replay(pool: asyncpg.Pool, keys: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Queue deliveries again (each named by its id or its webhook-id), whatever their
    state, with the same webhook-id and a fresh retry schedule; return them as queued, and
    the keys that name none.  A replayed delivery keeps its place in its transaction's
    order: it waits for an earlier pending event, and later pending ones wait for it; those
    replayed together are queued lowest seq first, so they go out in order."""
    ids = [int(k) for k in keys if k.isdigit() and len(k) < 19]
    found = await pool.fetch(
        """SELECT id, webhook_id, transaction_id, seq FROM outbound_deliveries
            WHERE id = ANY($1::bigint[]) OR webhook_id = ANY($2::text[]) ORDER BY transaction_id, seq""",
        ids, keys)
    named = {str(r["id"]) for r in found} | {r["webhook_id"] for r in found}
    replayed = [await _replay_one(pool, r["id"]) for r in found]
    return replayed, [k for k in keys if k not in named]


async def _replay_one(pool: asyncpg.Pool, delivery_id: int) -> dict[str, Any]:
    async with pool.acquire(timeout=db.ACQUIRE_TIMEOUT) as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT id, transaction_id, seq FROM outbound_deliveries WHERE id = $1 FOR UPDATE", delivery_id)
        await conn.execute("SELECT FROM transactions WHERE id = $1 FOR SHARE", row["transaction_id"])
        await conn.execute(
            f"UPDATE outbound_deliveries SET next_attempt_at = NULL WHERE transaction_id = $1 AND seq > $2 AND {_PENDING}",
            row["transaction_id"], row["seq"])
        await conn.execute(
            f"""UPDATE outbound_deliveries
                   SET delivered_at = NULL, failed_at = NULL, attempts = 0, queued_at = clock_timestamp(),
                       next_attempt_at = CASE WHEN EXISTS (
                           SELECT FROM outbound_deliveries WHERE transaction_id = $2 AND seq < $3 AND {_PENDING})
                         THEN NULL ELSE clock_timestamp() END
                 WHERE id = $1""", row["id"], row["transaction_id"], row["seq"])
        await conn.execute("SELECT pg_notify($1, '')", OUTBOUND_CHANNEL)
        listed = await conn.fetchrow(f"{_LISTED} WHERE d.id = $1", row["id"])
    return _plain(listed)
