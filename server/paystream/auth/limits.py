"""Bounds on what one client may hold: open streams per token and per address, and the
size of request headers (bodies are bounded where they are read)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from paystream.auth.tokens import Grant
from paystream.errors import ApiError, error_body


class StreamLimits:
    def __init__(self, per_token: int, per_address: int) -> None:
        self.per_token, self.per_address = per_token, per_address
        self._tokens: Counter[str] = Counter()
        self._addresses: Counter[str] = Counter()

    def acquire(self, grant: Grant, credential: str, address: str) -> Callable[[], None]:
        """Count one open stream, or raise ApiError 429; call the result when it closes.
        The merchant's backend (API key) is not limited: one trusted caller, often behind
        one address."""
        if grant.backend:
            return _nothing
        if self._tokens[credential] >= self.per_token:
            raise ApiError(429, "too_many_streams", f"this token already holds {self.per_token} open streams")
        if self._addresses[address] >= self.per_address:
            raise ApiError(429, "too_many_streams", f"this address already holds {self.per_address} open streams")
        self._tokens[credential] += 1
        self._addresses[address] += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            for counter, key in ((self._tokens, credential), (self._addresses, address)):
                counter[key] -= 1
                if counter[key] <= 0:
                    del counter[key]

        return release


def _nothing() -> None:
    pass


class HeaderLimit:
    """Refuse requests whose headers exceed max_bytes (431) before any route runs."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            size = sum(len(k) + len(v) for k, v in scope["headers"]) + len(scope.get("query_string", b""))
            if size > self.max_bytes:
                body = json.dumps(error_body("headers_too_large",
                                             f"headers and query over {self.max_bytes} bytes")).encode()
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1009})
                    return
                await send({"type": "http.response.start", "status": 431,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
