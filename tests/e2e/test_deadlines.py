"""Connections that never finish their request are closed (issue 14): before, one that
sent nothing or half a header was held open indefinitely (75 s and counting)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from paystream.dev import trigger
from tests.conftest import Server
from tests.support import Paystream

pytestmark = pytest.mark.e2e

DEADLINE = 2.0  # PAYSTREAM_HEADER_TIMEOUT on this module's server (default 10)


@pytest.fixture(scope="module")
def strict(database_url: str) -> Iterator[Server]:
    srv = Server(database_url, {"PAYSTREAM_HEADER_TIMEOUT": str(DEADLINE)}).start()
    yield srv
    srv.stop()


@pytest.fixture
async def sps(strict: Server) -> AsyncIterator[Paystream]:
    async with Paystream(strict) as client:
        yield client


async def until_closed(reader: asyncio.StreamReader, limit: float) -> tuple[float, bytes]:
    """Read until the server closes (EOF or reset): (seconds it took, what it sent)."""
    started, got = time.monotonic(), b""
    try:
        async with asyncio.timeout(limit):
            while chunk := await reader.read(65536):
                got += chunk
    except (ConnectionResetError, TimeoutError):
        pass  # reset: closed; timeout: still open (the caller sees how long it waited)
    return time.monotonic() - started, got


async def test_unfinished_requests_are_closed_within_the_deadline(sps: Paystream) -> None:
    port = sps.server.port
    pi = trigger.stripe_id("pi_")
    await sps.deliver(sps.event("payment_intent.processing", pi))
    kinds = {
        "nothing": b"",
        "half a request line": b"GET /v1/transactions/",
        "half the headers": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ",
        "half a body": (b"POST /v1/stripe/webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 1000\r\n\r\n{\"id\": "),
        "half a WebSocket handshake": b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n",
    }
    conns = []
    for kind, data in kinds.items():
        for _ in range(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(data)
            conns.append((kind, reader, writer))
    # A keep-alive connection that answered one request, then sends half of the next.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.readuntil(b'{"status":"ok"}')).startswith(b"HTTP/1.1 200")
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    conns.append(("half of a second request", reader, writer))

    # Meanwhile the server answers everyone else.
    assert (await sps.http.get("/readyz")).status_code == 200
    assert (await sps.get(pi)).status_code == 200

    results = await asyncio.gather(*[until_closed(r, DEADLINE + 10) for _kind, r, _w in conns])
    for (kind, _reader, writer), (took, got) in zip(conns, results, strict=True):
        writer.close()
        assert took < DEADLINE + 3, f"{kind}: still open after {took:.1f} s"
        if kind == "nothing":
            assert got == b"", got  # nothing asked, nothing answered: closed as an idle keep-alive
        else:
            head, _, body = got.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), (kind, got)
            assert json.loads(body)["error"]["code"] == "request_timeout"
    # A new connection: the client's pooled one sat idle past the deadline meanwhile, and
    # the server closing an idle keep-alive connection can race a request sent on it.
    async with httpx.AsyncClient(base_url=sps.server.base_url, timeout=10) as fresh:
        assert (await fresh.get("/readyz")).status_code == 200


async def test_requests_that_arrive_in_time_are_not_cut(sps: Paystream) -> None:
    """The deadline covers reading a request, not answering it: a long-poll and an SSE
    stream outlive it, and a keep-alive connection serves request after request."""
    pi = trigger.stripe_id("pi_")
    await sps.deliver(sps.event("payment_intent.processing", pi))
    waited = await sps.get(pi, **{"await": "succeeded", "timeout": str(DEADLINE + 1.5)})
    assert waited.status_code == 200 and waited.json()["timed_out"] is True
    async with sps.sse(pi, params={"follow": "true"}) as stream:
        assert (await stream.event()).event == "snapshot"
        await asyncio.sleep(DEADLINE + 1)
        await sps.deliver(sps.event("payment_intent.succeeded", pi))
        assert (await stream.event()).json["status"] == "succeeded"
    reader, writer = await asyncio.open_connection("127.0.0.1", sps.server.port)
    for _ in range(6):  # 3 s in all, past the deadline, with 1.5 s to spare between requests
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readuntil(b'{"status":"ok"}')).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(DEADLINE / 4)
    writer.close()


async def test_an_endless_header_is_refused_at_64_kib(sps: Paystream) -> None:
    """httptools buffers a header without limit until it ends; the app's 431 only sees
    finished headers.  Past 64 KiB of an unfinished head the server answers 431 and closes."""
    sock = socket.create_connection(("127.0.0.1", sps.server.port))
    sock.settimeout(10)
    sent = 0
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        for _ in range(1024):  # up to 16 MiB
            sock.sendall(b"a" * 16384)
            sent += 16384
    except OSError:
        pass  # the server closed: what it said is in the receive buffer
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except OSError:
        pass
    sock.close()
    assert sent < 16 << 20, "the server read 16 MiB of one header"  # (the rest sits in kernel buffers)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "headers_too_large"
