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

`paystream serve` (cli._run_uvicorn) runs uvicorn with `http=` this class.  It reads its
settings from the environment once per process, so each `--workers` process has them.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from paystream.errors import error_body


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
        self.in_head = True  # waiting for (the rest of) a request line and headers
        self.head_bytes = 0
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
        was_head = self.in_head
        super().data_received(data)
        if was_head and self.in_head and not self.transport.is_closing():
            self.head_bytes += len(data)
            if self.head_bytes > _bounds()[1]:
                self.disarm()
                self.refuse(_answer(431, "Request Header Fields Too Large", "headers_too_large",
                                    f"request line and headers over {_bounds()[1]} bytes"))

    def on_message_begin(self) -> None:
        self.head_bytes = 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.parser.should_upgrade() and self._should_upgrade():
            self.disarm()  # a WebSocket handshake: the socket's own bounds take over
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.in_head = True
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
