"""Lean HTTP/1.1 clients for load generation: an SSE reader and a keep-alive webhook sender.

Plain asyncio streams, so the client side costs little CPU per event and per connection
and the numbers measure paystream rather than the client library.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from paystream.dev import trigger


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed before a response")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


@dataclass
class SSEEvent:
    id: int | None
    event: str | None
    data: str


class SSEStream:
    """One SSE connection: `await next_event()` returns the next event (pings skipped),
    or None when the server ends the stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._buf = ""
        self._chunked = False

    @classmethod
    async def open(cls, host: str, port: int, path: str, headers: dict[str, str] | None = None) -> SSEStream:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n{extra}\r\n".encode())
        status, hdrs = await _read_head(reader)
        if status != 200:
            writer.close()
            raise ConnectionError(f"SSE {path} answered {status}")
        stream = cls(reader, writer)
        stream._chunked = hdrs.get("transfer-encoding") == "chunked"
        return stream

    async def _more(self) -> bool:
        if self._chunked:
            size_line = await self.reader.readline()
            if not size_line:
                return False
            size = int(size_line.strip() or b"0", 16)
            if size == 0:
                return False
            data = await self.reader.readexactly(size + 2)
            self._buf += data[:-2].decode()
        else:
            data = await self.reader.read(65536)
            if not data:
                return False
            self._buf += data.decode()
        return True

    async def next_event(self) -> SSEEvent | None:
        while True:
            while "\n\n" not in self._buf:
                if not await self._more():
                    return None
            block, self._buf = self._buf.split("\n\n", 1)
            ev = SSEEvent(None, None, "")
            for line in block.split("\n"):
                name, _, value = line.partition(": ")
                if name == "id":
                    ev.id = int(value)
                elif name == "event":
                    ev.event = value
                elif name == "data":
                    ev.data = value
            if ev.event is not None:
                return ev

    def close(self) -> None:
        self.writer.close()


class _KeepAlive:
    """One persistent HTTP/1.1 connection, one request at a time, JSON answers."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def connect(self) -> None:
        """Open the connection now (before a measured window), not at the first request."""
        if self._conn is None:
            self._conn = await asyncio.open_connection(self.host, self.port)

    async def _raw(self, head: str, body: bytes = b"") -> tuple[int, bytes]:
        await self.connect()
        assert self._conn is not None
        reader, writer = self._conn
        writer.write(f"{head}Host: {self.host}:{self.port}\r\n\r\n".encode() + body)
        status, headers = await _read_head(reader)
        return status, await reader.readexactly(int(headers.get("content-length", "0")))

    async def _request(self, head: str, body: bytes = b"") -> tuple[int, dict[str, Any]]:
        status, payload = await self._raw(head, body)
        return status, json.loads(payload or b"{}")

    def close(self) -> None:
        if self._conn is not None:
            self._conn[1].close()


class WebhookSender(_KeepAlive):
    """POSTs signed Stripe events over a keep-alive connection."""

    def __init__(self, host: str, port: int, secret: str) -> None:
        super().__init__(host, port)
        self.secret = secret

    def prepare(self, event: dict[str, Any]) -> tuple[str, bytes]:
        """The request head and body, signed now: build them before the clock starts, so
        the load generator's own JSON and HMAC work stays out of the measured window."""
        body = json.dumps(event).encode()
        return (f"POST /v1/stripe/webhook HTTP/1.1\r\nContent-Type: application/json\r\n"
                f"Stripe-Signature: {trigger.sign(body, self.secret)}\r\nContent-Length: {len(body)}\r\n", body)

    async def send(self, event: dict[str, Any] | tuple[str, bytes]) -> tuple[int, dict[str, Any]]:
        head, body = event if isinstance(event, tuple) else self.prepare(event)
        return await self._request(head, body)


class HttpGetter(_KeepAlive):
    """GETs JSON over a keep-alive connection (a polling browser, a long-polling one)."""

    async def get(self, path: str) -> tuple[int, dict[str, Any]]:
        return await self._request(f"GET {path} HTTP/1.1\r\n")

    async def get_text(self, path: str) -> str:
        return (await self._raw(f"GET {path} HTTP/1.1\r\n"))[1].decode()
