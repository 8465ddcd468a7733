"""SSE, WebSocket and long-poll endpoints over the hub.

Every stream opens the same way (open_subscription): register with the hub first, then
read, so no event can fall between the read and the first push.  After that, what a
client sees comes only from its Subscription: ordered by seq, never twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import asyncpg
from sse_starlette import EventSourceResponse
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from paystream import access, metrics, store
from paystream.errors import ApiError
from paystream.hub import IDLE, Hub, Subscription
from paystream.lifecycle import FINAL, RANK
from paystream.tokens import Grant

log = logging.getLogger("paystream.streams")

# WebSocket close code for a subscriber cut off for not reading: resume with `after`.
WS_CLOSE_SLOW_CONSUMER = 4008
WS_SEND_TIMEOUT = 30.0


async def open_subscription(
    conn: HTTPConnection, any_id: str, grant: Grant, after: int | None
) -> tuple[asyncpg.Record, Subscription]:
    """Authorise, subscribe, and read the transaction (after subscribing when a snapshot
    is wanted). Raises ApiError 403/404; never leaves a subscription behind on error."""
    hub: Hub = conn.app.state.hub
    pool: asyncpg.Pool = conn.app.state.pool
    if not grant.backend and grant.cus is None and any_id not in grant.txn:
        raise ApiError(403, "forbidden", "the token does not cover this transaction")
    sub: Subscription | None = None
    if any_id.startswith("txn_") and after is None:
        sub = hub.subscribe(any_id)  # the common case: one query, after subscribing
    try:
        row = await store.get_transaction(pool, any_id)
        if row is None:
            raise ApiError(404, "not_found", f"no transaction {any_id!r}")
        if not grant.allows(row["id"], row["stripe_id"], row["customer_id"]):
            raise ApiError(403, "forbidden", "the token does not cover this transaction")
        if sub is None:
            sub = hub.subscribe(row["id"], after)
            if after is None:
                row = await store.get_transaction(pool, row["id"])
                assert row is not None
        if after is None:
            hub.activate(sub, row["seq"])
        return row, sub
    except BaseException:
        if sub is not None:
            hub.unsubscribe(sub)
        raise


async def open_stream(
    request: Request, any_id: str, grant: Grant, after: int | None
) -> tuple[asyncpg.Record, Subscription, Callable[[], None]]:
    """A counted stream (429 past the limits) over open_subscription; call the returned
    release() when the stream ends."""
    release = request.app.state.limits.acquire(grant, access.credential(request), access.address(request))
    try:
        row, sub = await open_subscription(request, any_id, grant, after)
    except BaseException:
        release()
        raise
    return row, sub, release


def _cursor(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 9:  # "²".isdigit() is true
        raise ApiError(400, "bad_request", f"{name} must be a whole number of at least 0")
    return int(value)


def _flag(value: str | None, name: str) -> bool:
    if value is None or value.lower() in ("false", "0", ""):
        return False
    if value.lower() in ("true", "1"):
        return True
    raise ApiError(400, "bad_request", f"{name} must be true or false")


def _state_of(data: str) -> dict[str, Any]:
    """The transaction JSON inside a pushed event (without previous_status and cause)."""
    state = json.loads(data)
    state.pop("previous_status", None)
    state.pop("cause", None)
    return state


# --- SSE -------------------------------------------------------------------------------


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
    shutdown), not one per stream."""

    def __init__(self, content: AsyncIterator[bytes], sub: Subscription, on_close: Callable[[], None],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._sub = sub
        self._on_close = on_close

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
            async for chunk in body:
                # A reader that stops reading fills the socket and blocks this send.
                async with asyncio.timeout(self.send_timeout):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if watcher is not None:
                watcher.cancel()
            await body.aclose()
            self._on_close()


async def _close_when_gone(receive: Receive, sub: Subscription) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    sub.close("gone")


async def end_streams_on_shutdown(hub: Hub) -> None:
    """On SIGTERM, end every stream cleanly (a complete chunked body; WebSockets are then
    closed by uvicorn with 1012).  Clients reconnect after `retry` and resume with
    Last-Event-ID.  The signal is sse-starlette's own shutdown detection (its patched
    uvicorn exit handler, or uvicorn's should_exit), the one each of its streams waits on."""
    await EventSourceResponse._listen_for_exit_signal()
    log.info("shutting down: ending every stream")
    hub.close_all("shutdown")


def _sse(seq: int, event: str, data: str) -> bytes:
    return f"id: {seq}\nevent: {event}\ndata: {data}\n\n".encode()


async def sse(request: Request) -> EventSourceResponse:
    grant = access.reader(request)
    any_id = request.path_params["id"]
    after = _cursor(request.headers.get("last-event-id"), "Last-Event-ID")
    if after is None:
        after = _cursor(request.query_params.get("last_event_id"), "last_event_id")
    follow = _flag(request.query_params.get("follow"), "follow")
    row, sub, release = await open_stream(request, any_id, grant, after)
    hub: Hub = request.app.state.hub
    ping = request.app.state.settings.sse_ping_seconds

    async def events():  # noqa: ANN202
        yield b"retry: 1000\n\n"
        if after is None:
            yield _sse(row["seq"], "snapshot", json.dumps(store.render(row), separators=(",", ":")))
            if row["status"] in FINAL and not follow:
                return
        elif after >= row["seq"] and row["status"] in FINAL and not follow:
            return  # the client has seen the end already
        while (item := await sub.get(idle=ping)) is not None:
            if item is IDLE:
                yield b": ping\n\n"  # the keep-alive comment, at least every PAYSTREAM_SSE_PING s
                continue
            seq, status, data = item
            yield _sse(seq, "status", data)
            if status in FINAL and not follow:
                return
        # Closed under us (slow reader, shutdown): the client reconnects and resumes.

    def close() -> None:
        hub.unsubscribe(sub)
        release()
        metrics.CONNECTIONS.labels("sse").dec()

    metrics.CONNECTIONS.labels("sse").inc()
    # Pings come from the generator's idle timer, not a task per stream.
    return PushResponse(events(), sub, close, ping=0, sep="\n", send_timeout=30)


# --- long-poll and plain reads ----------------------------------------------------------


async def _readable(request: Request, any_id: str, grant: Grant) -> asyncpg.Record:
    """The transaction, if it exists and the grant covers it (404 and 403 otherwise)."""
    if not grant.backend and grant.cus is None and any_id not in grant.txn:
        raise ApiError(403, "forbidden", "the token does not cover this transaction")
    row = await store.get_transaction(request.app.state.pool, any_id)
    if row is None:
        raise ApiError(404, "not_found", f"no transaction {any_id!r}")
    if not grant.allows(row["id"], row["stripe_id"], row["customer_id"]):
        raise ApiError(403, "forbidden", "the token does not cover this transaction")
    return row


async def _client_gone(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def get_transaction(request: Request) -> JSONResponse:
    grant = access.reader(request)
    any_id = request.path_params["id"]
    wanted = request.query_params.get("await")
    if wanted is None:
        return JSONResponse(store.render(await _readable(request, any_id, grant)))

    targets = {s.strip() for s in wanted.split(",") if s.strip()}
    unknown = targets - RANK.keys()
    if not targets or unknown:
        raise ApiError(400, "bad_request", f"await takes statuses from {sorted(RANK)}")
    targets |= FINAL
    limit = request.app.state.settings.long_poll_max_seconds
    try:
        timeout = float(request.query_params.get("timeout", "25"))
    except ValueError:
        timeout = -1
    if not 0 <= timeout <= limit:
        raise ApiError(400, "bad_request", f"timeout must be between 0 and {limit:g} seconds")

    row, sub, release = await open_stream(request, any_id, grant, None)
    hub: Hub = request.app.state.hub
    state = store.render(row)
    gone = asyncio.create_task(_client_gone(request))
    metrics.CONNECTIONS.labels("long_poll").inc()
    try:
        async with asyncio.timeout(timeout):
            while state["status"] not in targets:
                getter = asyncio.ensure_future(sub.get())
                await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone.done():
                    getter.cancel()
                    return JSONResponse(state)  # nobody reads it; stop waiting at once
                item = getter.result()
                if item is None:
                    break  # shutting down: answer with what we know
                state = _state_of(item[2])
    except TimeoutError:
        return JSONResponse({**state, "timed_out": True})
    finally:
        gone.cancel()
        hub.unsubscribe(sub)
        release()
        metrics.CONNECTIONS.labels("long_poll").dec()
    return JSONResponse({**state, "timed_out": state["status"] not in targets})


# --- WebSocket ---------------------------------------------------------------------------


class WebSocketEndpoint:
    """GET /v1/ws as a bare ASGI app (Starlette wraps a plain function in two more
    coroutine layers that every idle socket would keep alive), running one WsSession."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await WsSession(WebSocket(scope, receive, send)).run()


class WsSession:
    """One socket carrying any number of transactions: a pump task per subscription
    writes its rows; the session's own task reads subscribe/unsubscribe messages.
    A class with slots rather than closures: fewer objects per idle socket."""

    __slots__ = ("ws", "grant", "hub", "pumps", "send_lock")

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.hub: Hub = ws.app.state.hub
        self.pumps: dict[str, tuple[Subscription, asyncio.Task[None]]] = {}
        self.send_lock = asyncio.Lock()

    async def run(self) -> None:
        ws = self.ws
        try:
            self.grant = access.reader(ws)
            release = ws.app.state.limits.acquire(self.grant, access.credential(ws), access.address(ws))
        except ApiError as exc:
            await ws.send_denial_response(
                JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status_code=exc.status)
            )
            return
        await ws.accept()
        metrics.CONNECTIONS.labels("ws").inc()
        try:
            while True:
                await self.handle(await ws.receive_text())
        except WebSocketDisconnect:
            pass
        finally:
            for client_id in list(self.pumps):
                self.unsubscribe(client_id)
            release()
            metrics.CONNECTIONS.labels("ws").dec()
            with contextlib.suppress(Exception):
                await ws.close()

    async def handle(self, raw: str) -> None:
        msg_id = None
        try:
            msg = json.loads(raw)
            if not isinstance(msg, dict):
                raise ApiError(400, "bad_request", "messages are JSON objects")
            msg_id = msg.get("id")
            if msg.get("op") == "subscribe":
                await self.subscribe(msg)
            elif msg.get("op") == "unsubscribe":
                self.unsubscribe(str(msg_id))
            else:
                raise ApiError(400, "bad_request", "op must be subscribe or unsubscribe")
        except ValueError:
            await self.send({"op": "error", "id": None, "code": "bad_request", "message": "not JSON"})
        except ApiError as exc:
            code = {403: "forbidden", 404: "not_found"}.get(exc.status, "bad_request")
            await self.send({"op": "error", "id": msg_id, "code": code, "message": exc.message})

    async def send(self, message: dict[str, Any] | str) -> None:
        text = message if isinstance(message, str) else json.dumps(message, separators=(",", ":"))
        async with self.send_lock:
            try:
                # A client that stops reading blocks the send: give up on it after a while.
                await asyncio.wait_for(self.ws.send_text(text), WS_SEND_TIMEOUT)
            except TimeoutError:
                await self.ws.close(WS_CLOSE_SLOW_CONSUMER, "not reading; resubscribe with after")
                raise WebSocketDisconnect(WS_CLOSE_SLOW_CONSUMER) from None

    async def pump(self, client_id: str, sub: Subscription) -> None:
        prefix = f'{{"op":"status","id":{json.dumps(client_id)},"seq":'
        while (item := await sub.get()) is not None:
            seq, _status, data = item
            await self.send(f'{prefix}{seq},"data":{data}}}')
        if sub.reason == "overflow":
            await self.ws.close(WS_CLOSE_SLOW_CONSUMER, "too far behind; resubscribe with after")

    async def subscribe(self, msg: dict[str, Any]) -> None:
        client_id = msg.get("id")
        after = msg.get("after")
        if not isinstance(client_id, str) or not client_id:
            raise ApiError(400, "bad_request", "subscribe needs an `id`")
        if after is not None and (not isinstance(after, int) or isinstance(after, bool) or after < 0):
            raise ApiError(400, "bad_request", "`after` must be a whole number of at least 0")
        if client_id in self.pumps:
            raise ApiError(400, "bad_request", "already subscribed")
        row, sub = await open_subscription(self.ws, client_id, self.grant, after)
        if after is None:
            await self.send({"op": "snapshot", "id": client_id, "seq": row["seq"], "data": store.render(row)})
        self.pumps[client_id] = (sub, asyncio.create_task(self.pump(client_id, sub)))

    def unsubscribe(self, client_id: str) -> None:
        entry = self.pumps.pop(client_id, None)
        if entry is not None:
            self.hub.unsubscribe(entry[0])
            entry[1].cancel()
