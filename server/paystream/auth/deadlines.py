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

from paystream.errors import error_body

# Reads are parsed this many bytes at a time (see the module docstring).  Small enough that
# the overcount leaves a head the app accepts (PAYSTREAM_MAX_HEADER_BYTES, 16 KiB) far
# below the bound, large enough that a 1 MiB body is a few dozen parser calls.
HEAD_SLICE = 8192


@functools.cache
def _bounds() -> tuple[float, int]:
    from paystream.config import Settings

    settings = Settings()
    return settings.header_timeout, max(64 * 1024, 2 * settings.max_header_bytes + 8192)


def _answer(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps(error_body(code, message)).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class BoundedHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline: asyncio.TimerHandle | None = None
        self.heard = False  # bytes of a request arrived since the deadline was armed
        self.open_head = False  # a request has begun and its headers have not all arrived
        self.heads_begun = 0
        self.head_bytes = 0  # of the open head (an overcount by less than HEAD_SLICE)
        self.unanswered = 0  # requests fully read whose responses are not complete

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
        self.arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
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
            if self._should_upgrade():
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
        if self.parser.should_upgrade() and self._should_upgrade():
            self.disarm()  # a WebSocket handshake: the socket's own bounds take over
        super().on_headers_complete()

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
