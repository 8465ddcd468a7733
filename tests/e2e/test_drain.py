"""The paced drain (PAYSTREAM_DRAIN_SECONDS): on SIGTERM a node stops accepting connections
and ends its open streams spread over the drain, not all at once, while a webhook in
flight still gets its answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
import websockets

from paystream.dev import trigger
from tests.conftest import Server
from tests.e2e.test_ws import recv, ws_url
from tests.support import SSE, Paystream, wait_until

pytestmark = pytest.mark.e2e
DRAIN = 3.0
SSE_CLIENTS, WS_CLIENTS = 60, 8


def unread_bytes(port: int) -> int:
    """Bytes sent to the local `port` over established connections that its server has not
    read yet (Linux: the rx queue in /proc/net/tcp; the accept backlog counts too)."""
    total = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(path):  # a kernel without IPv6
            continue
        with open(path) as table:
            next(table)
            for line in table:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # ESTABLISHED
                    total += int(fields[4].split(":")[1], 16)
    return total


async def test_sigterm_ends_streams_spread_over_the_drain(database_url: str, db: asyncpg.Connection) -> None:
    server = await asyncio.to_thread(Server(database_url, {"PAYSTREAM_DRAIN_SECONDS": str(DRAIN)}).start)
    try:
        async with Paystream(server) as ps, contextlib.AsyncExitStack() as stack:
            base = int(time.time()) - 60
            pis = [trigger.stripe_id("pi_") for _ in range(SSE_CLIENTS + WS_CLIENTS)]
            await asyncio.gather(*(ps.deliver(ps.event("payment_intent.processing", pi, created=base))
                                   for pi in pis))
            streams: list[SSE] = [await stack.enter_async_context(ps.sse(pi)) for pi in pis[:SSE_CLIENTS]]
            for s in streams:
                assert (await s.event()).event == "snapshot"
            sockets = []
            for pi in pis[SSE_CLIENTS:]:
                ws = await stack.enter_async_context(websockets.connect(ws_url(ps, ps.token(pi))))
                await ws.send(json.dumps({"op": "subscribe", "id": pi}))
                assert (await recv(ws))["op"] == "snapshot"
                sockets.append(ws)

            ended: list[float] = []
            ws_ended: list[float] = []
            codes: list[int | None] = []

            async def sse_end(s: SSE) -> None:
                assert await s.rest(timeout=20) == []  # a clean end: the client reconnects elsewhere
                ended.append(time.monotonic())

            async def ws_end(ws: websockets.ClientConnection) -> None:
                with contextlib.suppress(websockets.ConnectionClosed):
                    while True:
                        await asyncio.wait_for(ws.recv(), 20)
                ended.append(time.monotonic())
                ws_ended.append(time.monotonic())
                codes.append(ws.close_code)

            # A webhook in flight when the signal comes: its headers and part of its body
            # are in, the rest follows during the drain.
            event = ps.event("payment_intent.succeeded", trigger.stripe_id("pi_"))  # no stream watches it
            raw = trigger.encode(event)
            raw = raw if isinstance(raw, bytes) else raw.encode()
            started, rest = asyncio.Event(), asyncio.Event()

            async def body() -> AsyncIterator[bytes]:
                yield raw[:20]
                started.set()
                await rest.wait()
                yield raw[20:]

            webhook = asyncio.create_task(ps.http.post(
                "/v1/stripe/webhook", content=body(),
                headers={"Content-Type": "application/json", "Content-Length": str(len(raw)),
                         "Stripe-Signature": trigger.sign(raw, server.webhook_secret)}))
            await started.wait()

            async def head_read() -> bool:  # the server has read it: the request is in flight
                return unread_bytes(server.port) == 0

            await wait_until(head_read, what="the server to read the webhook's head")
            waiting = [asyncio.create_task(sse_end(s)) for s in streams]
            waiting += [asyncio.create_task(ws_end(ws)) for ws in sockets]
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)

            # The listening socket closes at uvicorn's next tick (0.1 s): poll, each time on a
            # new connection, until one is not served. A connection the kernel took into the
            # backlog just before the socket closed is reset instead of refused (ReadError):
            # not served either.
            refused_after = None
            no_reuse = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=server.base_url, timeout=2, limits=no_reuse) as fresh:
                while refused_after is None and time.monotonic() - t0 < 3.0:
                    try:
                        await fresh.get("/healthz")
                    except (httpx.NetworkError, httpx.RemoteProtocolError):  # refused, reset, closed
                        refused_after = time.monotonic() - t0
                    else:
                        await asyncio.sleep(0.05)
            assert refused_after is not None, "new connections still accepted 3 s after SIGTERM"
            rest.set()
            answer = await webhook
            assert answer.status_code == 200, answer.text

            await asyncio.gather(*waiting)
            code = await asyncio.to_thread(server.proc.wait, 10)
            exited = time.monotonic() - t0

        times = sorted(t - t0 for t in ended)
        per_half_second = [sum(i * 0.5 <= t < i * 0.5 + 0.5 for t in times) for i in range(int(DRAIN * 2) + 2)]
        print(f"\ndrain {DRAIN} s, {len(times)} streams: first {times[0]:.2f} s, last {times[-1]:.2f} s, "
              f"exit {exited:.2f} s, per 0.5 s: {per_half_second}, sockets {sorted(round(t - t0, 2) for t in ws_ended)}")
        assert code == 128 + signal.SIGTERM, server.log_tail()
        assert codes == [1012] * WS_CLIENTS
        assert max(ws_ended) - min(ws_ended) > 0.5, "sockets are paced too, not all closed by uvicorn at once"
        assert len(times) == SSE_CLIENTS + WS_CLIENTS
        assert times[0] < 1.0, "the first streams end at once"
        assert DRAIN - 1.0 < times[-1] < DRAIN + 2.0, "the last ones near the end of the drain"
        busiest = max(sum(t <= u < t + 0.5 for u in times) for t in times)
        # Spread, not all at once (uvicorn alone ends them all within a tick); the bound
        # leaves room for a stall of the loaded machine.
        assert busiest <= 0.5 * len(times), f"{busiest} of {len(times)} streams ended within 0.5 s"
        assert exited < DRAIN + 4.0
        assert "Application shutdown complete" in server.log_tail()
        assert await db.fetchval("SELECT processed_at IS NOT NULL FROM stripe_events WHERE id = $1", event["id"])
    finally:
        server.stop()
