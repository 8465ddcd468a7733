"""A deadline and a size bound on reading each request, below the ASGI app.

uvicorn's httptools protocol arms its keep-alive timer only after a response, so a
connection that sends nothing, or half a request line or header, and then waits was
never closed (75 s and counting in the review), and httptools buffers header bytes
without limit.  The ASGI app cannot help: it is only called once the headers are
complete.  BoundedHttpProtocol is uvicorn's httptools protocol plus:

- a deadline (PAYSTREAM_HEADER_TIMEOUT, 10 s): from the moment the connection is waiting
  for a request (it opened, or the previous response was sent) until that request has
  fully arrived (line, headers and body; for a WebSocket, its handshake headers).  When
  it passes, the connection is closed: silently if nothing of a request had arrived (as
  uvicorn's own keep-alive timeout does), else after a `408 request_timeout` answer,
  unless a response to the request had already begun;
- a bound on the bytes of an unfinished request head: 64 KiB, or more if
  PAYSTREAM_MAX_HEADER_BYTES is larger (the app's own 431 check is on the parsed headers,
  which httptools only hands over complete): beyond it, `431 headers_too_large` and close.
  Only a head still open after a read is counted, never the bodies or whole requests
  before it in that read (issue 22: a request over 64 KiB arriving in one read was
  processed and then answered 431).  httptools does not say where in a read a head
  began, so reads are parsed in slices of HEAD_SLICE bytes: a head that began inside a
  slice is counted as that whole slice, an overcount of less than HEAD_SLICE.

It also judges each connection as it is accepted: the per-address cap and the descriptors
kept for the server's own use (auth/connections.py).

`paystream serve` (cli._run_uvicorn) runs uvicorn with `http=` this class.  It reads its
settings from the environment once per process, so each `--workers` process has them.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import httptools
from starlette.requests import Request
from starlette.responses import Response
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from paystream.auth import connections
from paystream.errors import error_body

# Reads are parsed this many bytes at a time (see the module docstring).  Small enough that
# the overcount leaves a head the app accepts (PAYSTREAM_MAX_HEADER_BYTES, 16 KiB) far
# below the bound, large enough that a 1 MiB body is a few dozen parser calls.
HEAD_SLICE = 8192
# The longest a refused connection (over its address's cap) waits for its client to close.
LINGER = 2.0


@functools.cache
def _bounds() -> tuple[float, int]:
    from paystream.config import Settings

    settings = Settings()
    return settings.header_timeout, max(64 * 1024, 2 * settings.max_header_bytes + 8192)


def _answer(status: int, reason: str, code: str, message: str, retry_after: int | None = None) -> bytes:
    body = json.dumps(error_body(code, message)).encode()
    retry = f"retry-after: {retry_after}\r\n" if retry_after is not None else ""
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n{retry}"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


async def _server_busy(scope: Any, receive: Any, send: Any) -> None:
    """What a connection in the descriptor reserve gets for anything but a health check."""
    refusal = connections.ConnectionLimits.busy()
    body = json.dumps(error_body(refusal.code, refusal.message)).encode()
    await send({"type": "http.response.start", "status": refusal.status,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BoundedHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline: asyncio.TimerHandle | None = None
        self.heard = False  # bytes of a request arrived since the deadline was armed
        self.open_head = False  # a request has begun and its headers have not all arrived
        self.heads_begun = 0
        self.head_bytes = 0  # of the open head (an overcount by less than HEAD_SLICE)
        self.unanswered = 0  # requests fully read whose responses are not complete
        self.admission: connections.Admission | None = None  # counted until the connection is lost
        self.lingering = False  # refused, answered, and waiting for the client to close

    # --- the deadline ------------------------------------------------------------------

    def arm(self) -> None:
        self.disarm()
        self.heard = False
        self.deadline = self.loop.call_later(_bounds()[0], self.deadline_passed)

    def disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def deadline_passed(self) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if self.heard and (cycle is None or cycle.response_complete or not cycle.response_started):
            seconds = _bounds()[0]
            self.refuse(_answer(408, "Request Timeout", "request_timeout",
                                f"the request did not arrive within {seconds:g} seconds"))
        else:
            self.transport.close()

    def refuse(self, answer: bytes) -> None:
        self.transport.write(answer)
        self.transport.close()

    # --- uvicorn's protocol, with the deadline and the head bound -------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        admission = connections.limits().admit(transport.get_extra_info("peername"),
                                               sock.fileno() if sock is not None else 0)
        if admission.refusal is not None:
            self.refuse_connection(admission.refusal)
            return
        self.admission = admission
        self.arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        self.release()
        super().connection_lost(exc)

    def refuse_connection(self, r: connections.Refusal) -> None:
        """Answered at once, before any of the request is read.  Over the address's cap, the
        answer is followed by a FIN and what the client still sends is read and dropped
        until it closes (at most LINGER seconds): closing with its request unread would
        reset the connection, and a reset loses the answer at most clients.  In the
        descriptor reserve the descriptor matters more: closed at once."""
        self.transport.write(_answer(r.status, r.reason, r.code, r.message, retry_after=1))
        if r.status == 503 or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.lingering = True
        self.transport.write_eof()
        self.deadline = self.loop.call_later(LINGER, self.transport.abort)  # cancelled on close

    def release(self) -> None:
        if self.admission is not None:
            connections.limits().release(self.admission.key)
            self.admission = None

    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        ws = self.transport.get_protocol()
        if ws is self or self.admission is None:
            return
        # The WebSocket protocol is told of the close now: it releases the count then.
        lost = ws.connection_lost

        def connection_lost(exc: Exception | None) -> None:
            self.release()
            lost(exc)

        ws.connection_lost = connection_lost  # type: ignore[method-assign]

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # refused: read only so that closing sends no reset
        if self.deadline is not None:
            self.heard = True
        if len(data) <= HEAD_SLICE:
            self.parse(data)
            return
        view = memoryview(data)
        for start in range(0, len(data), HEAD_SLICE):
            if not self.parse(view[start:start + HEAD_SLICE]):
                return

    def parse(self, data: bytes | memoryview) -> bool:
        """uvicorn's data_received for one slice, then the head bound; False when the rest
        of the read is not for this parser (refused, closed, or upgraded)."""
        self._unset_keepalive_if_required()
        begun = self.heads_begun
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return False
        except httptools.HttpParserUpgrade:
            # As uvicorn: the WebSocket protocol takes over (the rest of this read is
            # dropped, as uvicorn drops it), or an unsupported upgrade is ignored.
            if self.transport.is_closing():
                pass  # refused (health_check_only): nothing to upgrade
            elif self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        if self.transport.is_closing():
            return False
        if self.open_head:
            # Begun in this slice: at most the whole slice is its.  Else all of it is.
            self.head_bytes = len(data) if self.heads_begun != begun else self.head_bytes + len(data)
            if self.head_bytes > _bounds()[1]:
                self.disarm()
                self.refuse(_answer(431, "Request Header Fields Too Large", "headers_too_large",
                                    f"request line and headers over {_bounds()[1]} bytes"))
                return False
        return True

    def on_message_begin(self) -> None:
        self.open_head = True
        self.heads_begun += 1
        self.head_bytes = 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self.open_head = False
        if self.admission is not None and self.admission.health_only:
            self.health_check_only()
            return
        if self.parser.should_upgrade() and self._should_upgrade():
            self.disarm()  # a WebSocket handshake: the socket's own bounds take over
        super().on_headers_complete()

    def health_check_only(self) -> None:
        """A connection in the descriptor reserve: a health check is answered, anything else
        is 503 server_busy; either way the connection closes after its one answer."""
        try:
            path = httptools.parse_url(self.url).path
        except httptools.HttpParserInvalidURLError:
            path = b""
        if self.parser.should_upgrade():
            r = connections.ConnectionLimits.busy()
            self.refuse(_answer(r.status, r.reason, r.code, r.message, retry_after=1))
            return
        app = self.app
        if path not in connections.HEALTH_PATHS:
            self.app = _server_busy
        try:
            super().on_headers_complete()
        finally:
            self.app = app
        self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            self.disarm()  # read in time; the app answers it
            self.unanswered += 1
        # else it was answered before its body ended: the deadline armed then runs on
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self.unanswered = max(0, self.unanswered - 1)
        super().on_response_complete()
        if not self.transport.is_closing() and self.unanswered == 0:
            self.arm()  # the next request has this long to arrive (keep-alive may close sooner)


async def client_gone_handler(request: Request, exc: Exception) -> Response:
    """A client that left (or was cut off by the deadline above) before its body arrived:
    there is nobody to answer and nothing wrong with the server, so no error is logged.
    (Without this, each such connection logged two tracebacks: a log flood for anyone
    opening slow connections.)"""
    return Response(status_code=400)
