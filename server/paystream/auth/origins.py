"""Which browser origins may use paystream (PAYSTREAM_ALLOWED_ORIGINS): CORS for the
HTTP endpoints, and the Origin check of WebSocket handshakes.

The checkout page almost always lives on another origin than paystream (shop.example
waiting on pay.example).  For an allowed origin, a preflight is answered for the methods
and request headers the SDK sends, and every response (streams included) carries
`Access-Control-Allow-Origin: <that origin>` and `Vary: Origin`.  Any other origin gets no
CORS headers at all (a preflight is refused with 403), so the browser refuses the
response.  A WebSocket handshake whose Origin is present and not allowed is closed
before it is accepted (the client sees HTTP 403); one without Origin (a server-side
client) is accepted.

The list holds exact origins (`https://shop.example`), `*` for any (only when written),
or an origin with `:*` as its port (`http://localhost:*`, what `paystream dev` allows).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from paystream.errors import error_body

_METHODS = b"GET, POST, OPTIONS"
_HEADERS = b"Authorization, Content-Type, Last-Event-ID, Idempotency-Key"
_MAX_AGE = b"600"
_EXPOSE = b"Retry-After"


class AllowedOrigins:
    def __init__(self, spec: str | None) -> None:
        self.any = False
        self.exact: set[str] = set()
        self.patterns: list[re.Pattern[str]] = []
        self.items: list[str] = []
        for item in (spec or "").split(","):
            item = item.strip().rstrip("/")
            if not item:
                continue
            self.items.append(item)
            if item == "*":
                self.any = True
            elif item.endswith(":*"):
                self.patterns.append(re.compile(re.escape(item[:-2]) + r":[0-9]{1,5}"))
            else:
                self.exact.add(item.lower())

    def __contains__(self, origin: str) -> bool:
        if self.any:
            return True
        origin = origin.lower()
        return origin in self.exact or any(p.fullmatch(origin) for p in self.patterns)

    def describe(self) -> str:
        return ", ".join(self.items) or "none (same-origin pages and server-side clients only)"


def _origin(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"origin":
            return value.decode("latin-1")
    return None


class OriginPolicy:
    """ASGI middleware applying AllowedOrigins to HTTP (CORS) and WebSocket handshakes.

    __call__ is a plain function: where it only passes the request on (no Origin, a
    WebSocket from an allowed origin) it returns the next app's awaitable, so no frame of
    its own stays alive for the life of the stream or socket (~0.3 KB each, tracemalloc)."""

    def __init__(self, app: ASGIApp, allowed: AllowedOrigins) -> None:
        self.app, self.allowed = app, allowed

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] not in ("http", "websocket"):
            return self.app(scope, receive, send)
        origin = _origin(scope)
        if origin is None:
            return self.app(scope, receive, send)
        allowed = origin in self.allowed
        if scope["type"] == "websocket":
            if not allowed:
                return send({"type": "websocket.close", "code": 1008, "reason": "origin not allowed"})
            return self.app(scope, receive, send)
        if scope["method"] == "OPTIONS" and any(name == b"access-control-request-method" for name, _ in scope["headers"]):
            return self._preflight(send, origin, allowed)
        if not allowed:
            return self.app(scope, receive, send)
        return self._with_cors(scope, receive, send, origin)

    async def _with_cors(self, scope: Scope, receive: Receive, send: Send, origin: str) -> None:
        cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                (b"access-control-expose-headers", _EXPOSE)]

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    @staticmethod
    async def _preflight(send: Send, origin: str, allowed: bool) -> None:
        if allowed:
            headers = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                       (b"access-control-allow-methods", _METHODS), (b"access-control-allow-headers", _HEADERS),
                       (b"access-control-max-age", _MAX_AGE), (b"content-length", b"0")]
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        body = json.dumps(error_body("origin_not_allowed", "this origin is not in PAYSTREAM_ALLOWED_ORIGINS")).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
