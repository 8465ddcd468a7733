"""One stream's interest in one transaction: a cursor (the last seq handed over) and a
bounded queue of log rows.  The cursor is what makes delivery ordered, gap-free and
duplicate-free whatever path a row took: a notification, a resume replay, or the
catch-up after a reconnect."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from paystream.ops import metrics

Item = tuple[int, str, str]  # (seq, status, data as JSON text)

# What Subscription.get returns when its idle time passes with nothing to hand over.
IDLE: Item = (0, "", "")


def _expire(waiter: asyncio.Future[Item | None]) -> None:
    if not waiter.done():
        waiter.set_result(IDLE)


class Subscription:
    """One stream's interest in one transaction, with a bounded queue of log rows."""

    __slots__ = ("txn_id", "last_seq", "pending_seq", "closed", "reason", "on_close", "_items", "_waiter",
                 "_limit", "_bytes", "_byte_limit")

    def __init__(self, txn_id: str, after: int | None, limit: int, byte_limit: int = 1 << 20) -> None:
        self.txn_id = txn_id
        # None until the stream has read its snapshot: rows before it must not be pushed.
        self.last_seq = after
        # The highest seq notified while waiting for the snapshot.
        self.pending_seq = 0
        self.closed = False
        self.reason: str | None = None
        # Called with the reason when it closes: a stream blocked writing to a client that
        # does not read is not waiting in get(), and must hear of a cut-off all the same.
        self.on_close: Callable[[str], None] | None = None
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
            if self.on_close is not None:
                self.on_close(reason)

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
