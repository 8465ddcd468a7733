"""Server-Sent Events: GET /v1/transactions/{id}/events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from paystream.auth import access
from paystream.changes import store
from paystream.changes.lifecycle import ENDS
from paystream.ops import metrics
from paystream.push.hub import Hub
from paystream.push.streams import CLOSE_GRACE, abort, cursor, flag, open_stream
from paystream.push.subscription import IDLE, Subscription

log = logging.getLogger("paystream.sse")


class PushResponse(EventSourceResponse):
    """sse-starlette's response (its headers, HEAD handling and `retry`/`id` framing)
    streamed with one task instead of four.

    EventSourceResponse runs every stream as an anyio task group: a sender, a disconnect
    listener and a shutdown listener, each with its own Event, plus the group's scopes.
    tracemalloc over 1,000 idle streams put that at ~17 KB and ~100 objects per stream,
    40% of all the memory an idle stream holds, and every object is more work for each
    full garbage collection.  Here the handler's own task writes what the generator
    yields; one plain task waits for the client to leave and closes the subscription,
    which ends the generator; and shutdown is one watcher per process (end_streams_on_
    shutdown), not one per stream.

    A reader that stops reading fills the socket and blocks a send.  It is cut off when
    that send has waited `send_timeout` seconds, or at once when its subscription closes
    meanwhile (it overflowed, or the node shuts down); the end of the body then gets
    CLOSE_GRACE seconds, and if it cannot be written the connection is aborted: closing
    it (uvicorn's way) waited for the queued megabytes to be read, which was never.  One
    log line says so; no traceback."""

    def __init__(self, content: AsyncIterator[bytes], sub: Subscription, on_close: Callable[[], None],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._sub = sub
        self._on_close = on_close
        self._sending: asyncio.Timeout | None = None  # the deadline of the send in progress
        sub.on_close = self._closed

    def _closed(self, reason: str) -> None:
        # A client that left unblocks the send itself; one cut off or shut down would not.
        if reason != "gone" and self._sending is not None:
            self._sending.reschedule(asyncio.get_running_loop().time())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream until the generator ends; then, however it ended (even before the
        generator started), run on_close exactly once."""
        body = self.body_iterator
        assert isinstance(body, AsyncGenerator)
        watcher: asyncio.Task[None] | None = None
        try:
            if scope["method"] == "HEAD":
                await super().__call__(scope, receive, send)
                return
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            watcher = asyncio.get_running_loop().create_task(_close_when_gone(receive, self._sub))
            stalled = False  # a send was given up on
            try:
                async for chunk in body:
                    try:
                        async with asyncio.timeout(self.send_timeout) as self._sending:
                            await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    finally:
                        self._sending = None  # a deadline can only be moved while it runs
            except TimeoutError:
                stalled = True
            aborted = False
            try:
                async with asyncio.timeout(CLOSE_GRACE if stalled else self.send_timeout):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            except TimeoutError:
                aborted = True
                # uvicorn's RequestResponseCycle (this receive's owner) holds the connection.
                transport = getattr(getattr(receive, "__self__", None), "transport", None)
                if transport is not None:
                    abort(transport)
                    # Return once uvicorn has seen it go (the watcher hears the disconnect), or
                    # it reports a response left unfinished.
                    await asyncio.wait((watcher,), timeout=CLOSE_GRACE)
            if self._sub.reason == "overflow":
                why = "too far behind"
            elif stalled and self._sub.closed:  # ended (shut down) while a send was blocked
                why = "not reading at the end of its stream" if aborted else ""
            elif stalled or aborted:
                why = f"not reading for {self.send_timeout:g} s"
            else:
                why = ""
            if why:
                client = scope.get("client")
                log.warning("SSE stream to %s cut off, %s: %s", f"{client[0]}:{client[1]}" if client else "?",
                            why, "connection aborted" if aborted else "body ended",
                            extra={"transaction_id": self._sub.txn_id})
        finally:
            if watcher is not None:
                watcher.cancel()
            await body.aclose()
            self._on_close()


async def _close_when_gone(receive: Receive, sub: Subscription) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    sub.close("gone")


async def end_streams_on_shutdown(hub: Hub, drain_seconds: float = 0.0) -> None:
    """On SIGTERM, end every stream cleanly, spread evenly over `drain_seconds`
    (PAYSTREAM_DRAIN_SECONDS; 0: all at once) so clients reconnect to the other nodes in a
    trickle: an SSE stream gets a complete chunked body (its client reconnects after `retry`
    and resumes with Last-Event-ID), a WebSocket closes with 1012 (ws_protocol keeps uvicorn
    from closing them all first), and any stream opened meanwhile ends at once.  The signal is
    sse-starlette's own shutdown detection (its patched uvicorn exit handler, or uvicorn's
    should_exit), the one each of its streams waits on."""
    await EventSourceResponse._listen_for_exit_signal()
    log.info("shutting down: ending every stream over %g s", drain_seconds)
    await hub.drain(drain_seconds, "shutdown")


def _until(exp: float | None, ping: float) -> float:
    """The next idle wake-up: the ping interval, or the token's expiry if that is sooner."""
    return ping if exp is None else max(0.001, min(ping, exp - time.time()))  # 0 would mean "never"


def _sse(seq: int, event: str, data: str) -> bytes:
    return f"id: {seq}\nevent: {event}\ndata: {data}\n\n".encode()


async def sse(request: Request) -> Response:
    grant = access.reader(request)
    any_id = request.path_params["id"]
    after = cursor(request.headers.get("last-event-id"), "Last-Event-ID")
    if after is None:
        after = cursor(request.query_params.get("last_event_id"), "last_event_id")
    follow = flag(request.query_params.get("follow"), "follow")
    row, sub, release = await open_stream(request, any_id, grant, after)
    hub: Hub = request.app.state.hub
    ping = request.app.state.settings.sse_ping_seconds
    if after is not None and after >= row["seq"] and row["status"] in ENDS and not follow:
        # The client has seen the end already: 204 is the HTML standard's signal for
        # EventSource to stop reconnecting (an empty 200 made a browser's own EventSource
        # reconnect every second for as long as the tab stayed open).
        hub.unsubscribe(sub)
        release()
        return Response(status_code=204)

    async def events():  # noqa: ANN202
        yield b"retry: 1000\n\n"
        if after is None:
            yield _sse(row["seq"], "snapshot", json.dumps(store.render(row), separators=(",", ":")))
            if row["status"] in ENDS and not follow:
                return
        while (item := await sub.get(idle=_until(grant.exp, ping))) is not None:
            if item is IDLE:
                if grant.expired():
                    # The token the stream was opened with has expired: end cleanly; the
                    # client reconnects with a fresh one and resumes from its seq.
                    return
                yield b": ping\n\n"  # the keep-alive comment, at least every PAYSTREAM_SSE_PING s
                continue
            seq, status, data = item
            yield _sse(seq, "status", data)
            if status in ENDS and not follow:
                return
        # Closed under us (slow reader, shutdown): the client reconnects and resumes.

    def close() -> None:
        hub.unsubscribe(sub)
        release()
        metrics.CONNECTIONS.labels("sse").dec()

    metrics.CONNECTIONS.labels("sse").inc()
    # Pings come from the generator's idle timer, not a task per stream.
    return PushResponse(events(), sub, close, ping=0, sep="\n", send_timeout=30)


