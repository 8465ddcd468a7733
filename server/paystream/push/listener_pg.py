"""The Postgres LISTEN listener: one connection per process, checked every second and
re-established with backoff when lost, hearing the `paystream` channel (and any other
channel a component asks for, such as the outbox's).  It connects to PAYSTREAM_LISTEN_URL
when DATABASE_URL is a transaction pooler: LISTEN needs a session of its own.

After every (re)connect it proves that it hears what the writers send: a NOTIFY sent over
a fresh connection to DATABASE_URL (the writers' path) must arrive within 2 s, else the
process stays unready and says why.  Through a transaction-mode pooler a LISTEN is
accepted but hears nothing, so this is how that mistake shows."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Callable

import asyncpg

from paystream.changes.store import CHANNEL, notified_event
from paystream.db import DATABASE_ERRORS
from paystream.ops import metrics
from paystream.push.listener import LISTEN_MARK, Listener, OnChange, OnGap

log = logging.getLogger("paystream.listener")

# Asked of the server at connect; a pooler (PgBouncer) refuses unknown startup parameters.
_KEEPALIVES = {"tcp_keepalives_idle": "5", "tcp_keepalives_interval": "2", "tcp_keepalives_count": "2"}


class PgListener(Listener):
    def __init__(self, dsn: str, *, probe_dsn: str | None = None, check_interval: float = 1.0,
                 check_timeout: float = 2.0, probe_timeout: float = 2.0) -> None:
        self._dsn = dsn
        # Where the writers connect (DATABASE_URL): the self-test's NOTIFY goes that way.
        self._probe_dsn = probe_dsn
        self._probe_timeout = probe_timeout
        self._probe_channel = f"paystream_probe_{secrets.token_hex(6)}"
        self._probe_heard = asyncio.Event()
        self._verified = False
        self._warned = False
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
        return self.connected and self._verified

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
            if self.connected and not self._verified:
                await self._verify()
            await self._check()

    async def _connect(self) -> None:
        await self._drop_connection()
        self._lost.clear()
        # The server side notices a vanished client too (keepalives); ours is the check below.
        settings = {"application_name": LISTEN_MARK, **(_KEEPALIVES if self._keepalives else {})}
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
            settings = {"application_name": LISTEN_MARK}
            conn = await asyncpg.connect(self._dsn, timeout=5, server_settings=settings)
        conn.add_termination_listener(lambda _conn: self._lost.set())
        await conn.add_listener(CHANNEL, self._on_notify)
        if self._probe_dsn is not None:
            await conn.add_listener(self._probe_channel, lambda *_args: self._probe_heard.set())
        for channel, callback in self._channels.items():
            await conn.add_listener(channel, lambda *_args, cb=callback: cb())
            callback()
        self._conn = conn
        self._verified = self._probe_dsn is None
        self._warned = False
        if self._verified:
            self._up.set()
            metrics.LISTENER_UP.set(1)
        if self._connected_once:
            metrics.LISTENER_RECONNECTS.inc()
        self._connected_once = True
        log.info("listening on %r", CHANNEL)

    async def _verify(self) -> None:
        """Send a NOTIFY the way the writers do and wait for it here; bounded (about 2 s
        to send, 2 s to hear) and retried each check until heard.  Only a NOTIFY that was
        sent and not heard counts against the setup: a failed send (the database away)
        says nothing about it."""
        assert self._probe_dsn is not None
        self._probe_heard.clear()
        try:
            conn = await asyncpg.connect(self._probe_dsn, timeout=self._probe_timeout, statement_cache_size=0,
                                         server_settings={"application_name": "paystream-probe"})
        except (*DATABASE_ERRORS, asyncpg.InterfaceError) as exc:
            log.info("listener self-test: cannot reach the database to send its NOTIFY (%s); retrying", exc)
            return
        try:
            await asyncio.wait_for(conn.execute(f"NOTIFY {self._probe_channel}"), self._probe_timeout)
        except DATABASE_ERRORS as exc:
            log.info("listener self-test: its NOTIFY failed (%s); retrying", exc)
            return
        finally:
            conn.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._probe_heard.wait(), self._probe_timeout)
        if self._probe_heard.is_set():
            self._verified = True
            self._up.set()
            metrics.LISTENER_UP.set(1)
            if self._warned:
                log.info("listener self-test: its NOTIFY arrived; ready")
        elif not self._warned:
            self._warned = True
            log.error("the listener did not hear its own NOTIFY within %g s: LISTEN through a transaction "
                      "pooler? Point PAYSTREAM_LISTEN_URL straight at Postgres (or a session-mode pooler); "
                      "/readyz answers 503 until it hears one", self._probe_timeout)

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
