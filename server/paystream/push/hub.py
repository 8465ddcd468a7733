"""The subscriber registry and its fan-out: which local streams wait on which
transaction, and handing each the log rows past its own cursor.

Data flows one way: a webhook commits a log row and NOTIFYs {id, seq, status} and the
pushed event itself when it fits; the listener (listener.py; Postgres LISTEN today)
hears it and tells the hub; the hub hands the event to each local subscriber whose
cursor is just before it, with no database read, and reads the log (once for all local
subscribers of that transaction) only to fill a gap or when the notification carried
only a pointer.  Each Subscription's cursor (subscription.py) keeps delivery ordered,
gap-free and duplicate-free.  After a reconnect the listener asks the hub to catch up every
subscribed transaction from the log in one query.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import asyncpg

from paystream.changes import store
from paystream.db import DATABASE_ERRORS
from paystream.ops import metrics
from paystream.push.listener import Listener
from paystream.push.subscription import Subscription

log = logging.getLogger("paystream.hub")


def _updated_at(data: str) -> float | None:
    """updated_at of a logged event (its write time), without decoding the whole JSON."""
    at = data.find('"updated_at":"')
    if at < 0:
        return None
    try:
        return datetime.strptime(data[at + 14:at + 41], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


class Hub:
    def __init__(self, pool: asyncpg.Pool, listener: Listener, *, queue_limit: int = 1000,
                 queue_bytes: int = 1 << 20) -> None:
        self._pool = pool
        self.listener = listener
        self._queue_limit = queue_limit
        self._queue_bytes = queue_bytes
        self._subs: dict[str, set[Subscription]] = {}
        self._closing = False
        self._fetching: dict[str, bool] = {}  # txn id -> another fetch requested meanwhile
        self._tasks: set[asyncio.Task[None]] = set()
        # Open WebSocket sessions (ws.WsSession): the drain closes each as one stream.
        self.sessions: set[Any] = set()

    # --- life --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.listener.ready

    async def start(self) -> None:
        await self.listener.start(self._on_change, self._catch_up_all)

    async def wait_ready(self, timeout: float) -> bool:
        return await self.listener.wait_ready(timeout)

    async def stop(self) -> None:
        await self.listener.stop()
        for task in list(self._tasks):
            task.cancel()
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub.close("shutdown")
        self._subs.clear()

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

    @property
    def closing(self) -> bool:
        return self._closing

    async def drain(self, seconds: float, reason: str = "shutdown", step: float = 0.1) -> None:
        """The process is shutting down: every stream opened from here on ends at once, and
        those open end spread evenly over `seconds` (a slice every `step`, the first at
        once), so their clients reconnect to the other nodes in a trickle, not a wave.  A
        WebSocket session is one stream (closed whole, with 1012); every other subscription
        (SSE, long-poll) is one.  With 0 seconds all end at once."""
        self._closing = True
        on_sockets = {id(sub) for session in self.sessions for sub in session.subscriptions()}
        streams: list[Callable[[], None]] = [session.shutdown for session in self.sessions]
        streams += [functools.partial(sub.close, reason) for subs in self._subs.values() for sub in subs
                    if id(sub) not in on_sockets]
        random.shuffle(streams)  # sockets and SSE streams alike in every slice
        slices = max(1, round(seconds / step)) if seconds > 0 else 1
        log.info("draining %d streams over %g s", len(streams), seconds)
        loop = asyncio.get_running_loop()
        start = loop.time()
        done = 0
        for i in range(slices):
            upto = -(-len(streams) * (i + 1) // slices)
            for end in streams[done:upto]:
                end()
            done = upto
            if done >= len(streams):
                break
            await asyncio.sleep(max(0.0, start + (i + 1) * seconds / slices - loop.time()))

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

    def _on_change(self, txn_id: str, seq: int, status: str | None = None, data: str | None = None) -> None:
        """A committed change.  With its pushed event (`data`), every subscriber whose cursor
        is just before it gets it at once, with no database read; only a subscriber with a
        gap (or every one, when the notification was only a pointer) makes the log be read."""
        subs = self._subs.get(txn_id)
        if not subs:
            return  # nobody here waits on it: no query at all
        behind = pushed = False
        for sub in list(subs):
            if sub.last_seq is None:
                sub.pending_seq = max(sub.pending_seq, seq)
            elif sub.last_seq >= seq:
                continue
            elif data is not None and status is not None and sub.last_seq == seq - 1:
                sub.deliver(seq, status, data)
                pushed = True
                if sub.closed:
                    subs.discard(sub)
            else:
                behind = True
        if not subs:
            self._subs.pop(txn_id, None)
        if pushed:
            metrics.PUSHED_FROM_NOTIFY.inc()
            self._observe_latency_of(data)
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
                    metrics.LOG_READS.inc()
                    rows = await store.events_after(self._pool, txn_id, min(cursors))
                except DATABASE_ERRORS as exc:
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
        for row in rows:
            Hub._observe_latency_of(row["data"])

    @staticmethod
    def _observe_latency_of(data: str | None) -> None:
        written = _updated_at(data) if data else None
        if written is not None and 0 <= time.time() - written < 60:
            metrics.WEBHOOK_TO_PUSH.observe(time.time() - written)

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
