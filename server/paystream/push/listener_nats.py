"""NATS JetStream as the fan-out engine between nodes (PAYSTREAM_BROKER=nats://…), for a
fleet beyond what one Postgres's NOTIFY serialises: the process holds no LISTEN
connection, and a change's commit takes no NOTIFY lock (the outbound-webhook and
card-validation effects send no wake-up NOTIFY either: their work is found by the
publishing process, woken after each batch, or by the others' polling).

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
subscriber's seq cursor.  The consumer covers the whole stream, so its stream sequence
numbers are contiguous: a jump forward (messages this process never saw) is caught up
from the log at once, and a jump back (the stream was deleted and made again) or a
publish finding no stream reconnects, which re-creates the stream and catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable

import asyncpg
import nats
import nats.errors
import nats.js.errors
from nats.js.api import DeliverPolicy, DiscardPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext

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
# How often a connected process checks that its stream is still the one it subscribed to
# (deleted, or made again after NATS lost its storage: the consumer would go on silently
# from the old sequence number, so the process reconnects and catches up instead).
STREAM_CHECK_SECONDS = 2.0

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
        self._js: JetStreamContext | None = None
        self._sub: object | None = None
        self._stream_seq: int | None = None  # of the last message heard on this connection
        self._stream_created: object = None  # the stream's creation time, as subscribed
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
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.ready:
            # What this process committed last goes out now, not at another's next claim.
            with contextlib.suppress(*BROKER_ERRORS, *DATABASE_ERRORS):
                await asyncio.wait_for(self._publish_batch(), 2)
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
            except Exception as exc:  # noqa: BLE001 - whatever it was, retry; never end the task
                if isinstance(exc, (*BROKER_ERRORS, *DATABASE_ERRORS)):
                    log.warning("NATS connect failed (%s); retrying in %.1fs", exc or type(exc).__name__, backoff)
                else:
                    log.exception("NATS connect failed; retrying in %.1fs", backoff)
                await self._drop()
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            metrics.LISTENER_UP.set(1)
            self._up.set()
            self._wake.set()  # publish what waited while we were away
            while not self._lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), STREAM_CHECK_SECONDS)
                if not self._lost.is_set():
                    await self._check_stream()
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
            if isinstance(exc, nats.errors.SlowConsumerError | nats.js.errors.Error):
                # Messages dropped on our side, or the consumer could not be re-made (the
                # stream gone?): reconnect, which re-creates both, and catch up from the log.
                log.warning("NATS: %s; reconnecting to catch up", exc or type(exc).__name__)
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
        # One context per connection: each one's first publish opens a reply subscription
        # of its own, which would pile up if made per batch.
        js = self._js = nc.jetstream(timeout=self._publish_timeout)
        self._stream_created = await self._ensure_stream(js)
        self._stream_seq = None
        self._sub = await js.subscribe(f"{self._subjects}.>", cb=self._on_message, ordered_consumer=True,
                                       deliver_policy=DeliverPolicy.NEW)
        if self._connected_once:
            metrics.LISTENER_RECONNECTS.inc()
        self._connected_once = True
        for callback in self._channels.values():
            callback()
        log.info("listening on NATS stream %r (%s)", self._stream, ", ".join(self._servers))

    async def _ensure_stream(self, js: JetStreamContext) -> object:
        """Create the stream if it is missing, and return its creation time.  One that
        exists is left as it is (an operator may have given it replicas or other limits),
        as long as it takes our subjects and nothing else (the consumer checks that stream
        sequence numbers follow each other)."""
        wanted = f"{self._subjects}.>"
        try:
            info = await js.stream_info(self._stream)
        except nats.js.errors.NotFoundError:
            with contextlib.suppress(nats.js.errors.BadRequestError):  # another node was faster
                await js.add_stream(StreamConfig(
                    name=self._stream, subjects=[wanted], storage=StorageType.FILE, max_age=MAX_AGE_SECONDS,
                    duplicate_window=DUPLICATE_WINDOW_SECONDS, discard=DiscardPolicy.OLD))
                log.info("created the NATS stream %r", self._stream)
            info = await js.stream_info(self._stream)
        if (info.config.subjects or []) != [wanted]:
            raise nats.errors.Error(f"the NATS stream {self._stream!r} takes {info.config.subjects}, not only "
                                    f"{wanted!r}; give paystream a stream of its own (PAYSTREAM_BROKER_NAME)")
        return info.created

    async def _check_stream(self) -> None:
        js = self._js
        if js is None:
            return
        try:
            info = await asyncio.wait_for(js.stream_info(self._stream), self._publish_timeout)
        except nats.js.errors.NotFoundError:
            log.warning("the NATS stream %r is gone; reconnecting to make it again", self._stream)
            self._lost.set()
            return
        except BROKER_ERRORS as exc:
            log.warning("cannot check the NATS stream (%s)", exc or type(exc).__name__)  # pings judge the link
            return
        if info.created != self._stream_created:
            log.warning("the NATS stream %r was made again; reconnecting to catch up", self._stream)
            self._lost.set()

    async def _drop(self) -> None:
        self._up.clear()
        self._generation += 1
        self._js = None
        nc, self._nc, self._sub = self._nc, None, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(*BROKER_ERRORS):
                await asyncio.wait_for(nc.close(), 2)

    async def _on_message(self, msg: nats.aio.msg.Msg) -> None:
        self._check_sequence(msg)
        try:
            txn_id, seq, status, data = store.notified_event(msg.data.decode())
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            log.error("unreadable message on %s: %r", msg.subject, msg.data[:200])
            return
        assert self._on_change is not None
        self._on_change(txn_id, seq, status, data)

    def _check_sequence(self, msg: nats.aio.msg.Msg) -> None:
        """Every message of the stream comes to this consumer, so stream sequences follow
        each other; anything else means messages were not heard."""
        try:
            number = msg.metadata.sequence.stream
        except Exception:  # noqa: BLE001 - not a JetStream message: nothing to check
            return
        last, self._stream_seq = self._stream_seq, number
        if last is None or number == last + 1:
            return
        if number <= last:
            log.warning("NATS stream %r started again (sequence %d after %d); reconnecting",
                        self._stream, number, last)
            self._lost.set()
        else:
            log.warning("NATS: messages %d-%d of stream %r not heard; catching up from the log",
                        last + 1, number - 1, self._stream)
            assert self._on_gap is not None
            task = asyncio.create_task(self._on_gap())
            self._tasks.append(task)
            task.add_done_callback(self._tasks.remove)

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
            except (nats.js.errors.NoStreamResponseError, nats.js.errors.NotFoundError) as exc:
                # The stream is gone (deleted, or NATS lost its storage): reconnecting makes it
                # again and catches up; the rows stay queued meanwhile.
                log.warning("publishing to NATS found no stream (%s); reconnecting", exc or type(exc).__name__)
                self._lost.set()
            except (*BROKER_ERRORS, *DATABASE_ERRORS) as exc:
                # The rows stay queued (the claim rolled back): next second, or another process.
                log.warning("publishing to NATS failed (%s); will retry", exc or type(exc).__name__)
            except Exception:  # noqa: BLE001 - never end the task: the outbox would stop
                log.exception("publishing to NATS failed; will retry")

    async def _publish_batch(self) -> int:
        nc, js = self._nc, self._js
        if nc is None or js is None:
            return 0
        async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
            rows = await conn.fetch(_CLAIM, BATCH)
            if not rows:
                return 0
            acks = [await js.publish_async(f"{self._subjects}.{row['transaction_id']}",
                                           self._message(nc, row),
                                           headers={"Nats-Msg-Id": f"{row['transaction_id']}:{row['seq']}"})
                    for row in rows]
            await asyncio.wait_for(asyncio.gather(*acks), self._publish_timeout)
            await conn.execute("DELETE FROM broker_outbox WHERE id = ANY($1::bigint[])", [r["id"] for r in rows])
        metrics.BROKER_PUBLISHED.inc(len(rows))
        for callback in self._channels.values():
            callback()
        return len(rows)

    @staticmethod
    def _message(nc: nats.NATS, row: asyncpg.Record) -> bytes:
        """The event itself, or only a pointer (the nodes then read the log) when it would
        exceed what the server takes in one message."""
        message = store.broker_message(row["transaction_id"], row["seq"], row["status"], row["data"])
        if len(message) > nc.max_payload - 1024:  # room for the headers
            return json.dumps({"id": row["transaction_id"], "seq": row["seq"], "status": row["status"]},
                              separators=(",", ":")).encode()
        return message
