"""The Postgres LISTEN listener: one connection per process, checked every second and
re-established with backoff when lost, hearing the `paystream` channel (and any other
channel a component asks for, such as the outbox's).

Connected is not yet hearing: through a transaction-mode pooler LISTEN succeeds on some
server session and its notifications never come back.  So after every (re)connect the
listener sends a NOTIFY on a channel of its own through the pool (DATABASE_URL, the way
every webhook's NOTIFY goes) and is ready only once it has heard it, within 2 s."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
from collections.abc import Callable

import asyncpg

from paystream.changes.store import CHANNEL, notified_event
from paystream.db import DATABASE_ERRORS, within
from paystream.ops import metrics
from paystream.push.listener import Listener, OnChange, OnGap

log = logging.getLogger("paystream.listener")

POOLER_HINT = "LISTEN through a transaction pooler? set PAYSTREAM_LISTEN_URL to a direct connection"
# Asked of the server at connect; a pooler (PgBouncer) refuses unknown startup parameters.
_KEEPALIVES = {"tcp_keepalives_idle": "5", "tcp_keepalives_interval": "2", "tcp_keepalives_count": "2"}


class PgListener(Listener):
    def __init__(self, dsn: str, *, check_interval: float = 1.0, check_timeout: float = 2.0,
                 probe_pool: asyncpg.Pool | None = None, probe_timeout: float = 2.0) -> None:
        self._dsn = dsn
        # Where the self-test NOTIFY is sent (the pool every NOTIFY goes through); None:
        # no self-test, connected counts as hearing.
        self._probe_pool = probe_pool
        self._probe_timeout = probe_timeout
        self._probe_channel = f"paystream_probe_{os.getpid()}_{secrets.token_hex(4)}"
        self._probe_token = ""
        self._probe_heard = asyncio.Event()
        self._heard = False  # this connection has heard its own probe
        self._hinted = False  # the pooler hint is logged once until a probe is heard
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
        return self.connected and self._heard

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
            if self.connected and not self._heard:
                await self._prove()
            await self._check()

    async def _prove(self) -> None:
        """NOTIFY our probe channel through the pool; ready once this connection hears it
        within probe_timeout.  Not heard: one log line naming the likely cause, and the
        next check interval tries again."""
        if self._probe_pool is None:
            heard = True
        else:
            self._probe_token = secrets.token_hex(8)
            self._probe_heard.clear()
            try:
                await within(self._probe_timeout, self._probe_pool.execute(
                    "SELECT pg_notify($1, $2)", self._probe_channel, self._probe_token))
            except DATABASE_ERRORS as exc:
                # The pool itself is in trouble (e.g. its connections still hang after a
                # partition): that is /readyz's database check's to report.  The self-test
                # is for LISTEN through a pooler, which a NOTIFY that went through shows.
                log.warning("listener self-test could not NOTIFY through the pool (%s); skipped", exc)
                heard = True
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._probe_heard.wait(), self._probe_timeout)
                heard = self._probe_heard.is_set()
                if not heard and (self._lost.is_set() or not self.connected):
                    return  # the connection dropped meanwhile: the check reconnects, no hint
        if not heard:
            if not self._hinted:
                log.error("the listener did not hear its own NOTIFY within %gs; not ready: %s",
                          self._probe_timeout, POOLER_HINT)
                self._hinted = True
            return
        self._heard, self._hinted = True, False
        self._up.set()
        metrics.LISTENER_UP.set(1)

    def _on_probe(self, conn: object, pid: int, channel: str, payload: str) -> None:
        if payload == self._probe_token:
            self._probe_heard.set()

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
            # A pooler in front (PgBouncer): connect without them; the self-test says
            # whether notifications come back through it (they do in session mode).
            log.warning("the listener's server refused keepalive settings (%s): a pooler? "
                        "connecting without them", exc)
            self._keepalives = False
            settings = {"application_name": "paystream-listener"}
            conn = await asyncpg.connect(self._dsn, timeout=5, server_settings=settings)
        conn.add_termination_listener(lambda _conn: self._lost.set())
        if self._probe_pool is not None:
            await conn.add_listener(self._probe_channel, self._on_probe)
        await conn.add_listener(CHANNEL, self._on_notify)
        for channel, callback in self._channels.items():
            await conn.add_listener(channel, lambda *_args, cb=callback: cb())
            callback()
        self._conn = conn
        if self._probe_pool is None:
            self._heard = True
            self._up.set()
            metrics.LISTENER_UP.set(1)
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
        self._heard = False
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()
