"""The WebSocket: GET /v1/ws, several transactions on one socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from paystream.auth import access
from paystream.auth.limits import Lease
from paystream.auth.tokens import Grant
from paystream.changes import store
from paystream.errors import ApiError, error_response
from paystream.ops import metrics
from paystream.push.hub import Hub
from paystream.push.streams import CLOSE_GRACE, MAX_CURSOR, open_subscription
from paystream.push.subscription import Subscription

log = logging.getLogger("paystream.ws")

# Close codes (docs/contract.md, WebSocket).  1009 is also what uvicorn sends for a message
# over its ws_max_size, which `serve` sets to PAYSTREAM_WS_MAX_MESSAGE.
WS_CLOSE_TOO_BIG = 1009
WS_CLOSE_TOKEN_EXPIRED = 4001
# A subscriber cut off for not reading: resume with `after`.
WS_CLOSE_SLOW_CONSUMER = 4008
# More messages than PAYSTREAM_WS_MESSAGE_RATE / _BURST allow (cf. HTTP 429).
WS_CLOSE_TOO_MANY_MESSAGES = 4029
# The first `auth` of a socket opened without a token named one already holding its streams.
WS_CLOSE_POLICY = 1008
# The node is shutting down (the drain on SIGTERM): reconnect and resubscribe with `after`.
WS_CLOSE_RESTART = 1012
# A socket opened without a token must send {"op":"auth"} within this many seconds.
WS_AUTH_WINDOW = 5.0
WS_SEND_TIMEOUT = 30.0
# A client that does not read cannot take the close frame either: the protocol
# (ws_protocol) cuts it off after CLOSE_GRACE; this only bounds the wait if it did not.
WS_CLOSE_TIMEOUT = CLOSE_GRACE + 5

_ERROR_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found", 429: "too_many_streams"}


class WebSocketEndpoint:
    """GET /v1/ws as a bare ASGI app (Starlette wraps a plain function in two more
    coroutine layers that every idle socket would keep alive), running one WsSession."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await WsSession(WebSocket(scope, receive, send)).run()


class WsSession:
    """One socket carrying any number of transactions: a pump task per subscription
    writes its rows; the session's own task reads subscribe/unsubscribe/auth messages.
    A class with slots rather than closures: fewer objects per idle socket.

    Bounds: each message is at most PAYSTREAM_WS_MAX_MESSAGE bytes (uvicorn closes with
    1009 before buffering more; checked here too), and a token bucket admits
    PAYSTREAM_WS_MESSAGE_RATE messages a second with bursts of _BURST, so a client cannot
    turn its socket into a stream of database queries (a subscribe reads the transaction);
    beyond it the socket closes with 4029.  The grant expires with its token: a subscribe
    after `exp` is refused, and at `exp` the socket closes with 4001 unless an
    {"op":"auth"} message brought a fresh token first.  A socket opened with no credential
    at all starts with an empty grant that expires in WS_AUTH_WINDOW: its first message
    must be `auth` (a refused token closes it with 4001 at once).

    A client that does not read is cut off with 4008 when a send has been blocked for
    WS_SEND_TIMEOUT, or at once when one of its subscriptions overflows while a send is
    blocked; the protocol then ends the connection within CLOSE_GRACE if the close frame
    cannot be written, and the session gives back its stream at that disconnect.  One log
    line says so; no traceback."""

    __slots__ = ("ws", "grant", "hub", "pumps", "send_lock", "lease", "expiry", "closing", "closer",
                 "allowance", "stamp", "sending")

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.hub: Hub = ws.app.state.hub
        # client id -> (subscription, its pump, (txn id, stripe id, customer id) to re-check a renewed grant)
        self.pumps: dict[str, tuple[Subscription, asyncio.Task[None], tuple[str, str | None, str | None]]] = {}
        self.send_lock = asyncio.Lock()
        self.expiry: asyncio.TimerHandle | None = None
        self.closing = False
        self.closer: asyncio.Task[None] | None = None
        # The deadline of the send in progress, if one is: a subscription's overflow ends it.
        self.sending: asyncio.Timeout | None = None

    async def run(self) -> None:
        ws = self.ws
        try:
            # No credential at all: the token comes in the first message (it stays out of URLs).
            self.grant: Grant = access.reader(ws) if access.presented(ws) else \
                Grant(exp=time.time() + WS_AUTH_WINDOW)
            self.lease: Lease = ws.app.state.limits.acquire(self.grant, access.address(ws))
        except ApiError as exc:
            await ws.send_denial_response(error_response(exc.status, exc.code, exc.message))
            return
        settings = ws.app.state.settings
        self.allowance = float(settings.ws_message_burst)
        self.stamp = time.monotonic()
        metrics.CONNECTIONS.labels("ws").inc()
        try:
            await ws.accept()  # inside: a client gone already still gives its count back
            self.hub.sessions.add(self)  # the drain on SIGTERM closes it in its turn
            if self.hub.closing:
                self.shutdown()
            self.arm_expiry()
            while not self.closing:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect" or self.closing:
                    break
                if not await self.admit(message, settings):
                    break
                await self.handle(message)
        except WebSocketDisconnect:
            pass
        finally:
            self.hub.sessions.discard(self)
            if self.expiry is not None:
                self.expiry.cancel()
            for client_id in list(self.pumps):
                self.unsubscribe(client_id)
            self.lease.release()
            metrics.CONNECTIONS.labels("ws").dec()
            await self.close(1000, "")

    async def admit(self, message: Message, settings: Any) -> bool:
        """Size and rate bounds, before a message is parsed; False once the socket is closed."""
        data = message.get("text")
        if data is None:
            data = message.get("bytes") or b""
        if len(data) > settings.ws_max_message_bytes:  # characters ≤ bytes: uvicorn counts bytes first
            await self.close(WS_CLOSE_TOO_BIG, f"messages are at most {settings.ws_max_message_bytes} bytes")
            return False
        now = time.monotonic()
        self.allowance = min(float(settings.ws_message_burst),
                             self.allowance + (now - self.stamp) * settings.ws_message_rate)
        self.stamp = now
        if self.allowance < 1:
            await self.close(WS_CLOSE_TOO_MANY_MESSAGES,
                             f"more than {settings.ws_message_rate:g} messages a second")
            return False
        self.allowance -= 1
        return True

    async def handle(self, message: Message) -> None:
        msg_id = None
        try:
            raw = message.get("text")
            if raw is None:
                raise ApiError(400, "bad_request", "messages are JSON text frames; binary frames are not supported")
            try:
                msg = json.loads(raw)
            except RecursionError:
                raise ApiError(400, "bad_request", "the message is nested too deeply") from None
            except ValueError:
                raise ApiError(400, "bad_request", "not JSON") from None
            if not isinstance(msg, dict):
                raise ApiError(400, "bad_request", "messages are JSON objects")
            msg_id = msg.get("id")
            op = msg.get("op")
            if op == "subscribe":
                await self.subscribe(msg)
            elif op == "unsubscribe":
                self.unsubscribe(str(msg_id))
            elif op == "auth":
                await self.auth(msg)
            else:
                raise ApiError(400, "bad_request", "op must be subscribe, unsubscribe or auth")
        except ApiError as exc:
            await self.send({"op": "error", "id": msg_id if isinstance(msg_id, str) else None,
                             "code": _ERROR_CODES.get(exc.status, "bad_request"), "message": exc.message})

    async def send(self, message: dict[str, Any] | str) -> None:
        text = message if isinstance(message, str) else json.dumps(message, separators=(",", ":"))
        async with self.send_lock:
            if self.closing:
                raise WebSocketDisconnect(1000)
            try:
                # A client that stops reading blocks the send: give up on it after a while.
                try:
                    async with asyncio.timeout(WS_SEND_TIMEOUT) as self.sending:
                        await self.ws.send_text(text)
                finally:
                    self.sending = None  # a deadline can only be moved while it runs
            except TimeoutError:
                behind = any(entry[0].reason == "overflow" for entry in self.pumps.values())
                await self.cut_off("too far behind" if behind else f"not reading for {WS_SEND_TIMEOUT:g} s")
                raise WebSocketDisconnect(WS_CLOSE_SLOW_CONSUMER) from None

    def lagging(self, reason: str) -> None:
        """A subscription closed (Subscription.on_close): if it overflowed while a send is
        blocked, the client is not reading; stop waiting for that send now."""
        if reason == "overflow" and self.sending is not None:
            self.sending.reschedule(asyncio.get_running_loop().time())

    async def cut_off(self, why: str) -> None:
        """Close with 4008 (under the send lock), with one log line."""
        if self.closing:
            return
        client = self.ws.client
        txns = sorted({entry[2][0] for entry in self.pumps.values()})
        log.warning("WebSocket %s cut off, %s: closing with 4008 (subscriptions: %s)",
                    f"{client.host}:{client.port}" if client else "?", why, ", ".join(self.pumps) or "none",
                    extra={"transaction_id": ",".join(txns) or None})
        await self._close(WS_CLOSE_SLOW_CONSUMER, f"{why}; resubscribe with after")

    async def close(self, code: int, reason: str) -> None:
        """Close once, after any send in progress (every exit goes through here)."""
        if self.closing:
            return
        async with self.send_lock:
            await self._close(code, reason)

    async def _close(self, code: int, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        # Given up on, the socket ends anyway: uvicorn closes it when this session returns.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code, reason), WS_CLOSE_TIMEOUT)

    def shutdown(self) -> None:
        """Close with 1012, from outside (Hub.drain on SIGTERM): the client reconnects
        to another node and resubscribes with `after`."""
        if not self.closing:
            self.closer = asyncio.ensure_future(
                self.close(WS_CLOSE_RESTART, "shutting down; reconnect and resubscribe with after"))

    def subscriptions(self) -> list[Subscription]:
        return [entry[0] for entry in self.pumps.values()]

    @property
    def authenticated(self) -> bool:
        return self.grant.backend or bool(self.grant.key)

    def arm_expiry(self) -> None:
        """Close with 4001 when the grant's token expires (none for the API key)."""
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        if self.grant.exp is not None:
            delay = max(0.0, self.grant.exp - time.time())
            self.expiry = asyncio.get_running_loop().call_later(delay, self.expired)

    def expired(self) -> None:
        self.expiry = None
        reason = ("the token expired; renew it with op auth before exp" if self.authenticated else
                  f"no token: send op auth within {WS_AUTH_WINDOW:g} s")
        self.closer = asyncio.ensure_future(self.close(WS_CLOSE_TOKEN_EXPIRED, reason))

    async def pump(self, client_id: str, sub: Subscription) -> None:
        prefix = f'{{"op":"status","id":{json.dumps(client_id)},"seq":'
        try:
            while (item := await sub.get()) is not None:
                seq, _status, data = item
                await self.send(f'{prefix}{seq},"data":{data}}}')
            if sub.reason == "overflow":
                async with self.send_lock:
                    await self.cut_off("too far behind")
            elif sub.reason == "shutdown":  # subscribed while the node drains: go elsewhere now
                self.shutdown()
        except WebSocketDisconnect:
            pass  # the session is closing; its own task cleans up

    async def subscribe(self, msg: dict[str, Any]) -> None:
        client_id = msg.get("id")
        after = msg.get("after")
        if not isinstance(client_id, str) or not client_id:
            raise ApiError(400, "bad_request", "subscribe needs an `id`")
        if after is not None and (not isinstance(after, int) or isinstance(after, bool)
                                  or not 0 <= after <= MAX_CURSOR):
            raise ApiError(400, "bad_request", f"`after` must be a whole number from 0 to {MAX_CURSOR}")
        if client_id in self.pumps:
            raise ApiError(400, "bad_request", "already subscribed")
        if not self.authenticated:
            raise ApiError(401, "unauthorized", 'send {"op":"auth","token":…} first')
        if self.grant.expired():
            raise ApiError(401, "unauthorized", "the token has expired; send a fresh one with op auth")
        row, sub = await open_subscription(self.ws, client_id, self.grant, after)
        sub.on_close = self.lagging
        if after is None:
            try:
                await self.send({"op": "snapshot", "id": client_id, "seq": row["seq"], "data": store.render(row)})
            except BaseException:
                self.hub.unsubscribe(sub)
                raise
        self.pumps[client_id] = (sub, asyncio.create_task(self.pump(client_id, sub)),
                                 (row["id"], row["stripe_id"], row["customer_id"]))

    async def auth(self, msg: dict[str, Any]) -> None:
        """The socket's token (first, when the URL carried none), or a renewal: a fresh stream
        token replaces the grant and moves the expiry.  Whatever the new grant no longer
        covers is unsubscribed, each with a `forbidden` error."""
        token = msg.get("token")
        if not isinstance(token, str) or not token:
            raise ApiError(400, "bad_request", "auth needs a `token`")
        first = not self.authenticated
        try:
            grant = access.token(self.ws, token)  # 401 if it does not verify or has expired
            self.lease.move_to(grant)  # 429 if the new token already holds its streams
        except ApiError as exc:
            if not first:
                raise  # the socket keeps the token it has
            # The socket has no other credential: refused, it ends here.
            if exc.status == 429:
                await self.send({"op": "error", "id": None, "code": "too_many_streams", "message": exc.message})
                await self.close(WS_CLOSE_POLICY, "too many streams")
            else:
                await self.close(WS_CLOSE_TOKEN_EXPIRED, exc.message[:120])
            return
        self.grant = grant
        self.arm_expiry()
        for client_id, (_sub, _task, (txn_id, stripe_id, customer_id)) in list(self.pumps.items()):
            if not grant.allows(txn_id, stripe_id, customer_id):
                self.unsubscribe(client_id)
                await self.send({"op": "error", "id": client_id, "code": "forbidden",
                                 "message": "the new token does not cover this transaction; unsubscribed"})

    def unsubscribe(self, client_id: str) -> None:
        entry = self.pumps.pop(client_id, None)
        if entry is not None:
            self.hub.unsubscribe(entry[0])
            entry[1].cancel()
