"""NATS JetStream as the fan-out engine between nodes (PAYSTREAM_BROKER=nats://…), for a
fleet beyond what one Postgres's NOTIFY serialises: the process holds no LISTEN
connection, and its commits take no NOTIFY lock.

Postgres stays the source of truth.  A logged event is queued in broker_outbox by the very
statement that logs it (changes/store.py), so the queue commits or rolls back with the
change.  After commit (the pool's release of the connection tells us: on_release) this
process claims the queued rows, publishes each to JetStream with the message id
"<transaction id>:<seq>" (JetStream drops a second publish with the same id inside its
duplicate window), and deletes the rows in the claiming database transaction once
JetStream acknowledged them.  Every process also claims whatever is queued once a second,
so rows left by a process that died between commit and publish are relayed by another;
the claim skips rows another process holds (FOR UPDATE SKIP LOCKED).

Each process reads the stream with an ordered consumer from "now", and after every
(re)connect asks the hub to catch up from the log, exactly as after a lost LISTEN: a
message missed while away is in the log, and one heard twice is dropped by the
subscriber's seq cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

import asyncpg
import nats
import nats.errors
import nats.js.errors
from nats.js.api import DeliverPolicy, DiscardPolicy, StorageType, StreamConfig

from paystream.changes import store
from paystream.db import ACQUIRE_TIMEOUT, DATABASE_ERRORS
from paystream.ops import metrics
from paystream.push.listener import Listener, OnChange, OnGap

log = logging.getLogger("paystream.listener")

BROKER_ERRORS = (nats.errors.Error, OSError, TimeoutError)
BATCH = 500
# Messages are kept this long (a node away longer catches up from the log anyway), and a
# second publish of one event is dropped for this long (a relay happens within seconds).
MAX_AGE_SECONDS = 600
DUPLICATE_WINDOW_SECONDS = 120

_CLAIM = """
    SELECT o.id, o.transaction_id, o.seq, e.status, e.data::text AS data
      FROM broker_outbox o
      JOIN transaction_events e ON e.transaction_id = o.transaction_id AND e.seq = o.seq
     ORDER BY o.id
     LIMIT $1
       FOR UPDATE OF o SKIP LOCKED"""


class NatsListener(Listener):
    def __init__(self, servers: list[str], name: str, pool: asyncpg.Pool, *,
                 relay_interval: float = 1.0, publish_timeout: float = 5.0) -> None:
        self._servers = servers
        self._stream = name
        self._subjects = f"{name}.changes"
        self._pool = pool
        self._relay_interval = relay_interval
        self._publish_timeout = publish_timeout
        self._nc: nats.NATS | None = None
        self._sub: object | None = None
        self._lost = asyncio.Event()
        self._up = asyncio.Event()
        self._wake = asyncio.Event()
        self._connected_once = False
        self._generation = 0  # of the connection: a closed one's callbacks must not touch the next
        self._tasks: list[asyncio.Task[None]] = []
        self._channels: dict[str, Callable[[], None]] = {}
        self._on_change: OnChange | None = None
        self._on_gap: OnGap | None = None

    def on_channel(self, channel: str, callback: Callable[[], None]) -> None:
        """A wake-up for another component (the outbound deliverer, the Stripe outbox):
        called after each batch this process publishes and after every (re)connect.  Any
        process may do their work, so waking the publishing one is enough (the others poll)."""
        self._channels[channel] = callback

    def on_release(self) -> None:
        """The pool took a connection back: if its task queued events, publish them now."""
        if store.take_queued():
            self._wake.set()

    # --- Listener ----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._nc is not None and self._nc.is_connected and self._sub is not None

    async def start(self, on_change: OnChange, on_gap: OnGap) -> None:
        self._on_change, self._on_gap = on_change, on_gap
        self._tasks = [asyncio.create_task(self._supervise(), name="paystream-nats"),
                       asyncio.create_task(self._relay(), name="paystream-nats-relay")]

    async def wait_ready(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout)
        return self.ready

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._drop()

    # --- connection --------------------------------------------------------------------

    async def _supervise(self) -> None:
        assert self._on_gap is not None
        backoff = 0.1
        while True:
            metrics.LISTENER_UP.set(0)
            try:
                await self._connect()
                await self._on_gap()
            except (*BROKER_ERRORS, *DATABASE_ERRORS) as exc:
                log.warning("NATS connect failed (%s); retrying in %.1fs", exc or type(exc).__name__, backoff)
                await self._drop()
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            metrics.LISTENER_UP.set(1)
            self._up.set()
            self._wake.set()  # publish what waited while we were away
            await self._lost.wait()
            log.warning("NATS connection lost; reconnecting")
            await self._drop()

    async def _connect(self) -> None:
        await self._drop()
        self._lost.clear()
        generation = self._generation

        async def closed() -> None:
            if generation == self._generation:
                self._lost.set()

        async def error(exc: Exception) -> None:
            if generation != self._generation:
                return
            if isinstance(exc, nats.errors.SlowConsumerError):
                # Messages were dropped on our side: reconnect and catch up from the log.
                log.warning("NATS: this process fell behind the stream; catching up")
                self._lost.set()
            else:
                log.warning("NATS: %s", exc or type(exc).__name__)

        # Our own reconnect (not the client's) so that each new connection re-creates the
        # subscription and is followed by a catch-up from the log.  A silent server is
        # noticed within about ping_interval * (max_outstanding_pings + 1).
        nc = await nats.connect(servers=self._servers, name="paystream", allow_reconnect=False,
                                connect_timeout=2, ping_interval=5, max_outstanding_pings=2,
                                closed_cb=closed, disconnected_cb=closed, error_cb=error)
        self._nc = nc
        js = nc.jetstream(timeout=self._publish_timeout)
        config = StreamConfig(name=self._stream, subjects=[f"{self._subjects}.>"], storage=StorageType.FILE,
                              max_age=MAX_AGE_SECONDS, duplicate_window=DUPLICATE_WINDOW_SECONDS,
                              discard=DiscardPolicy.OLD)
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await js.update_stream(config)  # made by an older version with other limits
        self._sub = await js.subscribe(f"{self._subjects}.>", cb=self._on_message, ordered_consumer=True,
                                       deliver_policy=DeliverPolicy.NEW)
        if self._connected_once:
            metrics.LISTENER_RECONNECTS.inc()
        self._connected_once = True
        for callback in self._channels.values():
            callback()
        log.info("listening on NATS stream %r (%s)", self._stream, ", ".join(self._servers))

    async def _drop(self) -> None:
        self._up.clear()
        self._generation += 1
        nc, self._nc, self._sub = self._nc, None, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(*BROKER_ERRORS):
                await asyncio.wait_for(nc.close(), 2)

    async def _on_message(self, msg: nats.aio.msg.Msg) -> None:
        try:
            txn_id, seq, status, data = store.notified_event(msg.data.decode())
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            log.error("unreadable message on %s: %r", msg.subject, msg.data[:200])
            return
        assert self._on_change is not None
        self._on_change(txn_id, seq, status, data)

    # --- publishing --------------------------------------------------------------------

    async def _relay(self) -> None:
        """Publish what this process queued as soon as it commits, and every second
        whatever anyone left queued."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._relay_interval)
            self._wake.clear()
            if not self.ready:
                continue
            try:
                while await self._publish_batch() == BATCH:
                    pass
            except (*BROKER_ERRORS, *DATABASE_ERRORS) as exc:
                # The rows stay queued (the claim rolled back): next second, or another process.
                log.warning("publishing to NATS failed (%s); will retry", exc or type(exc).__name__)

    async def _publish_batch(self) -> int:
        nc = self._nc
        if nc is None:
            return 0
        js = nc.jetstream(timeout=self._publish_timeout)
        async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
            rows = await conn.fetch(_CLAIM, BATCH)
            if not rows:
                return 0
            acks = [await js.publish_async(f"{self._subjects}.{row['transaction_id']}",
                                           store.broker_message(row["transaction_id"], row["seq"],
                                                                row["status"], row["data"]),
                                           headers={"Nats-Msg-Id": f"{row['transaction_id']}:{row['seq']}"})
                    for row in rows]
            await asyncio.wait_for(asyncio.gather(*acks), self._publish_timeout)
            await conn.execute("DELETE FROM broker_outbox WHERE id = ANY($1::bigint[])", [r["id"] for r in rows])
        metrics.BROKER_PUBLISHED.inc(len(rows))
        for callback in self._channels.values():
            callback()
        return len(rows)
