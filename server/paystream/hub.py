"""One LISTEN connection per process, kept alive, fanning events out to subscribers.

Data flows one way: a webhook commits a log row and NOTIFYs {id, seq, status}; the hub
hears it, reads the new log rows once for all local subscribers of that transaction,
and hands each subscriber the rows past its own cursor.  The cursor (last seq handed
over) is what makes delivery ordered, gap-free and duplicate-free whatever path a row
took: a notification, a resume replay, or the catch-up after a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import asyncpg

from paystream import metrics, store

log = logging.getLogger("paystream.hub")

Item = tuple[int, str, str]  # (seq, status, data as JSON text)


def _updated_at(data: str) -> float | None:
    """updated_at of a logged event (its write time), without decoding the whole JSON."""
    at = data.find('"updated_at":"')
    if at < 0:
        return None
    try:
        return datetime.strptime(data[at + 14:at + 41], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


# What Subscription.get returns when its idle time passes with nothing to hand over.
IDLE: Item = (0, "", "")


def _expire(waiter: asyncio.Future[Item | None]) -> None:
    if not waiter.done():
        waiter.set_result(IDLE)


class Subscription:
    """One stream's interest in one transaction, with a bounded queue of log rows."""

    __slots__ = ("txn_id", "last_seq", "pending_seq", "closed", "reason", "_items", "_waiter", "_limit",
                 "_bytes", "_byte_limit")

    def __init__(self, txn_id: str, after: int | None, limit: int, byte_limit: int = 1 << 20) -> None:
        self.txn_id = txn_id
        # None until the stream has read its snapshot: rows before it must not be pushed.
        self.last_seq = after
        # The highest seq notified while waiting for the snapshot.
        self.pending_seq = 0
        self.closed = False
        self.reason: str | None = None
        self._items: deque[Item] | None = None  # made on the first row: most streams see one
        self._waiter: asyncio.Future[Item | None] | None = None
        self._limit = limit
        self._bytes = 0
        self._byte_limit = byte_limit

    def deliver(self, seq: int, status: str, data: str) -> None:
        if self.closed or self.last_seq is None or seq <= self.last_seq:
            return
        if self._items is None:
            self._items = deque()
        if len(self._items) >= self._limit or self._bytes + len(data) > self._byte_limit:
            # It stopped reading: cut it off rather than hold memory for it; the client
            # resumes from the last seq it saw.
            metrics.QUEUE_DROPS.inc()
            self.close("overflow")
            return
        self._items.append((seq, status, data))
        self._bytes += len(data)
        self.last_seq = seq
        metrics.PUSHED.inc()
        self._wake()

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.reason = reason
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, idle: float | None = None) -> Item | None:
        """The next row; None once closed and drained; IDLE after `idle` seconds without one.

        The idle timer is a loop callback, not a task: a stream's keep-alive ping costs no
        object while it waits (10,000 waiting streams are 10,000 fewer tasks)."""
        while not self._items:
            if self.closed:
                return None
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(idle, _expire, waiter) if idle else None
            try:
                if await waiter is IDLE:
                    return IDLE
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        item = self._items.popleft()  # type: ignore[union-attr]  # not empty, so not None
        self._bytes -= len(item[2])
        return item


class Hub:
    def __init__(
        self,
        dsn: str,
        pool: asyncpg.Pool,
        *,
        queue_limit: int = 1000,
        queue_bytes: int = 1 << 20,
        check_interval: float = 1.0,
        check_timeout: float = 2.0,
    ) -> None:
        self._dsn = dsn
        self._pool = pool
        self._queue_limit = queue_limit
        self._queue_bytes = queue_bytes
        # A dead connection is noticed within check_interval + check_timeout (< 5 s),
        # at once when the socket closes.
        self._check_interval = check_interval
        self._check_timeout = check_timeout
        self._subs: dict[str, set[Subscription]] = {}
        self._closing = False
        self._conn: asyncpg.Connection | None = None
        self._connected_once = False
        self._lost = asyncio.Event()
        self._up = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._fetching: dict[str, bool] = {}  # txn id -> another fetch requested meanwhile
        self._channels: dict[str, Callable[[], None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # --- life --------------------------------------------------------------------------

    def on_channel(self, channel: str, callback: Callable[[], None]) -> None:
        """Also LISTEN on `channel` and call `callback` for each notification (and after
        every reconnect, since notifications may have been missed meanwhile)."""
        self._channels[channel] = callback

    @property
    def ready(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def start(self) -> None:
        self._supervisor = asyncio.create_task(self._supervise(), name="paystream-hub")

    async def wait_ready(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout)
        return self.ready

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for task in list(self._tasks):
            task.cancel()
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub.close("shutdown")
        self._subs.clear()
        await self._drop_connection()

    async def _supervise(self) -> None:
        backoff = 0.1
        while True:
            if not self.ready:
                metrics.LISTENER_UP.set(0)
                try:
                    await self._connect()
                    # LISTEN is in place before this read, so a row committed meanwhile
                    # is either in the read or notified after it: nothing falls between.
                    await self._catch_up_all()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                    log.warning("listener connect failed (%s); retrying in %.1fs", exc, backoff)
                    await self._drop_connection()
                    await asyncio.sleep(backoff * (0.5 + random.random()))
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.1
                metrics.LISTENER_UP.set(1)
            await self._check()

    async def _connect(self) -> None:
        await self._drop_connection()
        self._lost.clear()
        conn = await asyncpg.connect(
            self._dsn,
            timeout=5,
            server_settings={
                "application_name": "paystream-listener",
                # The server side notices a vanished client too; ours is the check below.
                "tcp_keepalives_idle": "5",
                "tcp_keepalives_interval": "2",
                "tcp_keepalives_count": "2",
            },
        )
        conn.add_termination_listener(lambda _conn: self._lost.set())
        await conn.add_listener(store.CHANNEL, self._on_notify)
        for channel, callback in self._channels.items():
            await conn.add_listener(channel, lambda *_args, cb=callback: cb())
            callback()
        self._conn = conn
        self._up.set()
        if self._connected_once:
            metrics.LISTENER_RECONNECTS.inc()
        self._connected_once = True
        log.info("listening on %r", store.CHANNEL)

    async def _check(self) -> None:
        """Wait one interval (or until the socket drops), then prove the connection alive."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._lost.wait(), self._check_interval)
        conn = self._conn
        if conn is None or conn.is_closed() or self._lost.is_set():
            log.warning("listener connection lost; reconnecting")
            await self._drop_connection()
            return
        try:
            await asyncio.wait_for(conn.fetchval("SELECT 1"), self._check_timeout)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("listener connection failed its check (%s); reconnecting", exc)
            await self._drop_connection()

    async def _drop_connection(self) -> None:
        self._up.clear()
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    # --- subscribers -------------------------------------------------------------------

    def subscribe(self, txn_id: str, after: int | None = None) -> Subscription:
        """Register interest. With `after`, every row past it is replayed, then live rows;
        without, nothing is pushed until activate() sets the snapshot's seq."""
        sub = Subscription(txn_id, after, self._queue_limit, self._queue_bytes)
        if self._closing:
            sub.close("shutdown")  # the process is draining: end at once, resume elsewhere
        self._subs.setdefault(txn_id, set()).add(sub)
        if after is not None:
            self._schedule_fetch(txn_id)
        return sub

    def close_all(self, reason: str) -> None:
        """End every stream now and any opened from here on (the process is shutting down):
        each answers what it has, and its client resumes from its cursor elsewhere."""
        self._closing = True
        for subs in self._subs.values():
            for sub in subs:
                sub.close(reason)

    def activate(self, sub: Subscription, snapshot_seq: int) -> None:
        """The stream has read its snapshot at snapshot_seq: push what comes after."""
        sub.last_seq = snapshot_seq
        if sub.pending_seq > snapshot_seq:
            self._schedule_fetch(sub.txn_id)

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.txn_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.txn_id]
        sub.close("unsubscribed")

    # --- fan-out -----------------------------------------------------------------------

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        try:
            note = json.loads(payload)
            txn_id, seq = note["id"], note["seq"]
        except (ValueError, KeyError, TypeError):
            log.error("unreadable notification %r", payload[:200])
            return
        subs = self._subs.get(txn_id)
        if not subs:
            return  # nobody here waits on it: no query at all
        behind = False
        for sub in subs:
            if sub.last_seq is None:
                sub.pending_seq = max(sub.pending_seq, seq)
            elif sub.last_seq < seq:
                behind = True
        if behind:
            self._schedule_fetch(txn_id)

    def _schedule_fetch(self, txn_id: str) -> None:
        if txn_id in self._fetching:
            self._fetching[txn_id] = True  # the running fetch goes round once more
            return
        self._fetching[txn_id] = False
        task = asyncio.create_task(self._fetch(txn_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch(self, txn_id: str) -> None:
        attempt = 0
        try:
            while True:
                cursors = [s.last_seq for s in self._subs.get(txn_id, ()) if s.last_seq is not None]
                if not cursors:
                    return
                try:
                    rows = await store.events_after(self._pool, txn_id, min(cursors))
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                    attempt += 1
                    if attempt >= 5:
                        # Cannot read the log: end these streams so their clients resume
                        # elsewhere or later, rather than wait on rows that never come.
                        log.error("cannot read events of %s (%s); closing its streams", txn_id, exc)
                        for sub in list(self._subs.get(txn_id, ())):
                            sub.close("error")
                        return
                    await asyncio.sleep(0.05 * 2**attempt)
                    continue
                attempt = 0
                self._observe_latency(rows)
                self._deliver(txn_id, rows)
                if not self._fetching.get(txn_id):
                    return
                self._fetching[txn_id] = False
        finally:
            self._fetching.pop(txn_id, None)

    @staticmethod
    def _observe_latency(rows: list[asyncpg.Record]) -> None:
        """Webhook → push, once per row (not per subscriber); replays of old rows skipped."""
        now = time.time()
        for row in rows:
            written = _updated_at(row["data"])
            if written is not None and 0 <= now - written < 60:
                metrics.WEBHOOK_TO_PUSH.observe(now - written)

    def _deliver(self, txn_id: str, rows: Iterable[asyncpg.Record]) -> None:
        subs = self._subs.get(txn_id)
        if not subs:
            return
        rows = list(rows)
        for sub in list(subs):
            for row in rows:
                sub.deliver(row["seq"], row["status"], row["data"])
            if sub.closed:
                subs.discard(sub)
        if not subs:
            self._subs.pop(txn_id, None)

    async def _catch_up_all(self) -> None:
        cursors = []
        for txn_id, subs in self._subs.items():
            seqs = [s.last_seq for s in subs if s.last_seq is not None]
            if seqs:
                cursors.append((txn_id, min(seqs)))
        if not cursors:
            return
        rows = await store.events_after_many(self._pool, cursors)
        by_txn: dict[str, list[asyncpg.Record]] = {}
        for row in rows:
            by_txn.setdefault(row["transaction_id"], []).append(row)
        for txn_id, txn_rows in by_txn.items():
            self._deliver(txn_id, txn_rows)
        log.info("caught up %d subscribed transactions (%d rows) after reconnect", len(cursors), len(rows))
