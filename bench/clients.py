"""Lean HTTP/1.1 clients for load generation: an SSE reader and a keep-alive webhook sender.

Plain asyncio streams, so the client side costs little CPU per event and per connection
and the numbers measure paystream rather than the client library.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from paystream.auth import tokens
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


async def open_waiting(host: str, port: int, pi: str, token_secret: str) -> SSEStream:
    """A browser waiting on one transaction: its own stream token, the SSE stream opened
    and its snapshot read."""
    token = tokens.mint(token_secret, txn=[pi], ttl_seconds=3600)[0]
    stream = await SSEStream.open(host, port, f"/v1/transactions/{pi}/events?token={token}")
    snap = await stream.next_event()
    assert snap is not None and snap.event == "snapshot"
    return stream


async def await_final_push(client: Any, sse: bool = True) -> tuple[float, bool]:
    """Wait for the one push a subscriber of a `processing` transaction waits for: when it
    arrived (perf_counter), and whether it was seq 2 `succeeded` — and, on SSE, the last
    thing on the stream (the server ends it after a final status; anything before the end
    would be a duplicate).  `client` is an SSEStream, or any object whose next_event()
    answers (seq, status)."""
    if sse:
        ev = await client.next_event()
        got = (ev.id, json.loads(ev.data)["status"]) if ev else None
    else:
        got = await client.next_event()
    arrived = time.perf_counter()
    ok = got == (2, "succeeded")
    if sse and await client.next_event() is not None:
        ok = False
    return arrived, ok


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


async def send_paced(lanes: Sequence[Sequence[WebhookSender]], order: Sequence[str],
                     requests: dict[str, tuple[str, bytes]], rate: float) -> tuple[dict[str, float], list[float]]:
    """Webhooks at `rate` per second, open-loop: the k-th of `order` is due k / rate after
    the start and goes to target k mod len(lanes) (round-robin over nodes), on whichever
    of that target's keep-alive connections is free.  Every answer must be 200.  Returns
    when each was sent (perf_counter, by key of `order`) and every ack in ms."""
    queues: list[deque[tuple[int, str]]] = [deque() for _ in lanes]
    for k, key in enumerate(order):
        queues[k % len(lanes)].append((k, key))
    sent: dict[str, float] = {}
    acks: list[float] = []
    start = time.perf_counter()

    async def lane(sender: WebhookSender, queue: deque[tuple[int, str]]) -> None:
        while queue:
            k, key = queue.popleft()
            delay = start + k / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the load, not synchronising
            sent[key] = time.perf_counter()
            status, _ = await sender.send(requests[key])
            acks.append((time.perf_counter() - sent[key]) * 1000)
            assert status == 200, f"webhook for {key} answered {status}"

    await asyncio.gather(*(lane(s, queues[i]) for i, senders in enumerate(lanes) for s in senders))
    return sent, acks
