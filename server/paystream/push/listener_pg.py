"""The Postgres LISTEN listener: one connection per process, checked every second and
re-established with backoff when lost, hearing the `paystream` channel (and any other
channel a component asks for, such as the outbox's).  It connects to PAYSTREAM_LISTEN_URL
when DATABASE_URL is a transaction pooler: LISTEN needs a session of its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

import asyncpg

from paystream.changes.store import CHANNEL, notified_event
from paystream.db import DATABASE_ERRORS
from paystream.ops import metrics
from paystream.push.listener import Listener, OnChange, OnGap

log = logging.getLogger("paystream.listener")

# Asked of the server at connect; a pooler (PgBouncer) refuses unknown startup parameters.
_KEEPALIVES = {"tcp_keepalives_idle": "5", "tcp_keepalives_interval": "2", "tcp_keepalives_count": "2"}


class PgListener(Listener):
    def __init__(self, dsn: str, *, check_interval: float = 1.0, check_timeout: float = 2.0) -> None:
        self._dsn = dsn
        self._keepalives = True
        # A dead connection is noticed within check_interval + check_timeout (< 5 s),
        # at once when the socket closes.
        self._check_interval = check_interval
        self._check_timeout = check_timeout
        self._conn: asyncpg.Connection | None = None
        self._connected_once = False
        self._lost = asyncio.Event()
        self._up = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._channels: dict[str, Callable[[], None]] = {}
        self._on_change: OnChange | None = None
        self._on_gap: OnGap | None = None

    def on_channel(self, channel: str, callback: Callable[[], None]) -> None:
        """Also LISTEN on `channel` and call `callback` for each notification (and after
        every reconnect, since notifications may have been missed meanwhile)."""
        self._channels[channel] = callback

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    @property
    def ready(self) -> bool:
        return self.connected

    async def start(self, on_change: OnChange, on_gap: OnGap) -> None:
        self._on_change, self._on_gap = on_change, on_gap
        self._supervisor = asyncio.create_task(self._supervise(), name="paystream-listener")

    async def wait_ready(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout)
        return self.ready

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._drop_connection()

    async def _supervise(self) -> None:
        assert self._on_gap is not None
        backoff = 0.1
        while True:
            if not self.connected:
                metrics.LISTENER_UP.set(0)
                try:
                    await self._connect()
                    await self._on_gap()
                except DATABASE_ERRORS as exc:
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
        # The server side notices a vanished client too (keepalives); ours is the check below.
        settings = {"application_name": "paystream-listener", **(_KEEPALIVES if self._keepalives else {})}
        try:
            conn = await asyncpg.connect(self._dsn, timeout=5, server_settings=settings)
        except asyncpg.PostgresError as exc:
            if not (self._keepalives and "unsupported startup parameter" in str(exc)):
                raise
            # A pooler in front (PgBouncer): connect without them (LISTEN works through a
            # session-mode pooler; through a transaction-mode one it hears nothing).
            log.warning("the listener's server refused keepalive settings (%s): a pooler? "
                        "connecting without them", exc)
            self._keepalives = False
            settings = {"application_name": "paystream-listener"}
            conn = await asyncpg.connect(self._dsn, timeout=5, server_settings=settings)
        conn.add_termination_listener(lambda _conn: self._lost.set())
        await conn.add_listener(CHANNEL, self._on_notify)
        for channel, callback in self._channels.items():
            await conn.add_listener(channel, lambda *_args, cb=callback: cb())
            callback()
        self._conn = conn
        self._up.set()
        if self._connected_once:
            metrics.LISTENER_RECONNECTS.inc()
        self._connected_once = True
        log.info("listening on %r", CHANNEL)

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        try:
            txn_id, seq, status, data = notified_event(payload)
        except (ValueError, KeyError, TypeError):
            log.error("unreadable notification %r", payload[:200])
            return
        assert self._on_change is not None
        self._on_change(txn_id, seq, status, data)

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
            # execute: the simple protocol, no prepared statement (pooler-safe).
            await asyncio.wait_for(conn.execute("SELECT 1"), self._check_timeout)
        except DATABASE_ERRORS as exc:
            log.warning("listener connection failed its check (%s); reconnecting", exc)
            await self._drop_connection()

    async def _drop_connection(self) -> None:
        self._up.clear()
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()
