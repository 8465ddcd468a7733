"""The WebSocket: GET /v1/ws, several transactions on one socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from paystream.auth import access
from paystream.changes import store
from paystream.errors import ApiError, error_response
from paystream.ops import metrics
from paystream.push.hub import Hub
from paystream.push.streams import open_subscription
from paystream.push.subscription import Subscription

log = logging.getLogger("paystream.ws")

# WebSocket close code for a subscriber cut off for not reading: resume with `after`.
WS_CLOSE_SLOW_CONSUMER = 4008
WS_SEND_TIMEOUT = 30.0


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
            await ws.send_denial_response(error_response(exc.status, exc.code, exc.message))
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
