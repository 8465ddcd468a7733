"""Bounds on what one client may hold: open streams per token and per address, and the
size of request headers (bodies are bounded where they are read)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from paystream.auth.tokens import Grant
from paystream.errors import ApiError, error_body


class StreamLimits:
    """Open streams per token and per client address, counted in this process.

    With `serve --workers N` each worker counts its own, so a client reaching several
    workers may hold up to N times either limit (see the contract's Limits)."""

    def __init__(self, per_token: int, per_address: int) -> None:
        self.per_token, self.per_address = per_token, per_address
        self._tokens: Counter[bytes] = Counter()
        self._addresses: Counter[str] = Counter()

    def acquire(self, grant: Grant, address: str) -> Lease:
        """Count one open stream, or raise ApiError 429; call the result (or its release())
        when it closes.  Tokens are counted by Grant.key, what the token is, not by how it
        is spelled.  The merchant's backend (API key) is not limited: one trusted caller,
        often behind one address."""
        if grant.backend:
            return Lease(self, None, None)
        token = grant.key or None  # none yet: a WebSocket that will send its token in a message
        if token is not None:
            self._check_token(token)
        if self._addresses[address] >= self.per_address:
            raise ApiError(429, "too_many_streams", f"this address already holds {self.per_address} open streams")
        if token is not None:
            self._tokens[token] += 1
        self._addresses[address] += 1
        return Lease(self, token, address)

    def _check_token(self, key: bytes) -> None:
        if self._tokens[key] >= self.per_token:
            raise ApiError(429, "too_many_streams", f"this token already holds {self.per_token} open streams")

    def _drop(self, counter: Counter[Any], key: Any) -> None:
        counter[key] -= 1
        if counter[key] <= 0:
            del counter[key]


class Lease:
    """One counted stream.  Calling it (or release()) gives the count back, once."""

    __slots__ = ("_limits", "_token", "_address")

    def __init__(self, limits: StreamLimits | None, token: bytes | None, address: str | None) -> None:
        self._limits, self._token, self._address = limits, token, address

    def __call__(self) -> None:
        self.release()

    def release(self) -> None:
        limits, self._limits = self._limits, None
        if limits is None:
            return
        if self._token is not None:
            limits._drop(limits._tokens, self._token)
        if self._address is not None:
            limits._drop(limits._addresses, self._address)

    def move_to(self, grant: Grant) -> None:
        """The stream now reads under `grant` (a WebSocket renewed its token): count it
        against the new token instead, or raise ApiError 429 and change nothing.  The
        address count stays as it is."""
        limits = self._limits
        if limits is None:
            return
        new = None if grant.backend else grant.key or None
        if new == self._token:
            return
        if new is not None:
            limits._check_token(new)
            limits._tokens[new] += 1
        if self._token is not None:
            limits._drop(limits._tokens, self._token)
        self._token = new


class HeaderLimit:
    """Refuse requests whose headers exceed max_bytes (431) before any route runs.

    __call__ is a plain function returning the next app's awaitable (or the refusal's):
    an `async def` would keep one more coroutine frame alive for the whole life of every
    SSE stream and WebSocket (~0.3 KB each, tracemalloc)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] in ("http", "websocket"):
            size = sum(len(k) + len(v) for k, v in scope["headers"]) + len(scope.get("query_string", b""))
            if size > self.max_bytes:
                return self._refuse(scope, send)
        return self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1009})
            return
        body = json.dumps(error_body("headers_too_large", f"headers and query over {self.max_bytes} bytes")).encode()
        await send({"type": "http.response.start", "status": 431,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
