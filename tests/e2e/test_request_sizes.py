"""Requests of every size, whole or in pieces, each answered once (issue 22, item 6).

Before, the head-size guard below the app (auth/deadlines.py) counted every byte of a read
that began and ended "between heads" as head bytes: a request over 64 KiB arriving in one
read was processed and then answered 431 (Stripe would retry such a webhook for three
days), and pipelined requests written at once lost every answer.  These talk raw HTTP/1.1
over a socket, so how the bytes are written is what the test says."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import asyncpg
import pytest

from paystream.dev import trigger
from tests.conftest import Server
from tests.support import Paystream

pytestmark = pytest.mark.e2e

MAX_BODY = 1 << 20  # MAX_BODY_BYTES' default: the webhook body limit
PIECE = 1400  # "small pieces": about one TCP segment each, the head split mid-header too


@pytest.fixture
async def conn(server: Server) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, limit=4 << 20)
    yield reader, writer
    writer.close()


def request(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def send(writer: asyncio.StreamWriter, data: bytes, pieces: bool) -> None:
    if not pieces:
        writer.write(data)  # one write: the server reads it in as few reads as the kernel allows
        await writer.drain()
        return
    for start in range(0, len(data), PIECE):
        writer.write(data[start:start + PIECE])
        await writer.drain()


async def response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response (status, body), read by its Content-Length."""
    async with asyncio.timeout(30):
        head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    async with asyncio.timeout(30):
        return status, await reader.readexactly(length)


async def nothing_more(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The connection's next answer is to the next request: nothing else was queued before it."""
    writer.write(request("GET", "/healthz", {"Connection": "close"}))
    status, body = await response(reader)
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    async with asyncio.timeout(10):
        assert await reader.read() == b""


def webhook(server: Server, pi: str, size: int) -> tuple[dict, bytes]:
    """A signed `payment_intent.succeeded` whose body is exactly `size` bytes (large events
    are real: an invoice with many lines)."""
    event = trigger.build("payment_intent.succeeded", pi)
    event["data"]["object"]["description"] = ""
    bare = len(trigger.encode(event).encode())
    assert size >= bare, f"a {size}-byte event is smaller than the bare event ({bare})"
    event["data"]["object"]["description"] = "x" * (size - bare)
    body = trigger.encode(event).encode()
    assert len(body) == size
    headers = {"Content-Type": "application/json",
               "Stripe-Signature": trigger.sign(body, server.webhook_secret)}
    return event, request("POST", "/v1/stripe/webhook", headers, body)


SIZES = [1_100, 63_000, 65_000, 80_000, 130_000, MAX_BODY - 1]


@pytest.mark.parametrize("pieces", [False, True], ids=["one write", "small pieces"])
@pytest.mark.parametrize("size", SIZES)
async def test_a_webhook_of_any_size_is_answered_once_and_applied_once(
        server: Server, ps: Paystream, db: asyncpg.Connection, conn, size: int, pieces: bool) -> None:  # noqa: ANN001
    reader, writer = conn
    pi = trigger.stripe_id("pi_")
    event, data = webhook(server, pi, size)
    await send(writer, data, pieces)
    status, body = await response(reader)
    assert status == 200, body[:300]
    assert json.loads(body)["id"] == event["id"]
    await nothing_more(reader, writer)
    stored = await db.fetchrow("SELECT attempts, length(raw_body) AS size, processed_at FROM stripe_events "
                               "WHERE id = $1", event["id"])
    assert stored is not None and stored["attempts"] == 1 and stored["size"] == size
    assert stored["processed_at"] is not None
    applied = await db.fetchval("SELECT count(*) FROM transaction_events WHERE stripe_event_id = $1", event["id"])
    assert applied == 1
    assert (await ps.get(pi)).json()["status"] == "succeeded"


@pytest.mark.parametrize("pieces", [False, True], ids=["one write", "small pieces"])
async def test_a_webhook_over_the_body_limit_gets_its_400_and_is_not_stored(
        server: Server, ps: Paystream, db: asyncpg.Connection, conn, pieces: bool) -> None:  # noqa: ANN001
    reader, writer = conn
    pi = trigger.stripe_id("pi_")
    event, data = webhook(server, pi, MAX_BODY + 1)
    # The answer may come before the body is all sent: write and read at once.
    sending = asyncio.create_task(send(writer, data, pieces))
    status, body = await response(reader)
    await sending
    assert status == 400 and json.loads(body)["error"]["code"] == "payload_too_large", body[:300]
    await nothing_more(reader, writer)
    assert await db.fetchval("SELECT count(*) FROM stripe_events WHERE id = $1", event["id"]) == 0
    assert (await ps.get(pi)).status_code == 404


@pytest.mark.parametrize("pieces", [False, True], ids=["one write", "small pieces"])
async def test_a_large_create_is_answered_201_not_431(server: Server, conn, pieces: bool) -> None:  # noqa: ANN001
    """A 65,530-byte POST /v1/transactions (under the 64 KiB JSON limit; the review's size)
    created a PaymentIntent and was answered 431.  JSON allows the whitespace that pads it."""
    reader, writer = conn
    payload = json.dumps({"kind": "payment", "amount": 1234, "currency": "usd", "metadata": {"order": "big"}}).encode()
    body = payload[:-1] + b" " * (65_530 - len(payload)) + b"}"
    await send(writer, request("POST", "/v1/transactions", {
        "Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"}, body), pieces)
    status, answer = await response(reader)
    assert status == 201, answer[:300]
    assert json.loads(answer)["transaction"]["amount"] == 1234
    await nothing_more(reader, writer)


async def test_forty_pipelined_gets_written_at_once_are_each_answered_in_order(server: Server, ps: Paystream,
                                                                               conn) -> None:  # noqa: ANN001
    """Each request carries a 2 KB header (cookies and tracing headers are that large), so
    the forty together are over 64 KiB, as the review's were."""
    reader, writer = conn
    pis = [trigger.stripe_id("pi_") for _ in range(4)]
    for n, pi in enumerate(pis):
        await ps.deliver(ps.event("payment_intent.processing", pi, amount=100 + n))
    order = [pis[i % len(pis)] for i in range(40)]
    headers = {"Authorization": f"Bearer {server.api_key}", "X-Trace-Context": "t" * 2000}
    data = b"".join(request("GET", f"/v1/transactions/{pi}", headers) for pi in order)
    assert len(data) > 64 * 1024
    await send(writer, data, pieces=False)
    for pi in order:
        status, body = await response(reader)
        assert status == 200, body[:300]
        got = json.loads(body)
        assert got["stripe_id"] == pi and got["amount"] == 100 + pis.index(pi)
    await nothing_more(reader, writer)


@pytest.mark.parametrize("after_a_request", [False, True], ids=["alone", "after a finished request"])
def test_a_head_over_64_kib_in_one_write_still_gets_431(server: Server, after_a_request: bool) -> None:
    """A blocking socket: its recv returns what arrived before a reset (the server closes
    with the rest of the head unread), where asyncio's reader would only raise."""
    endless = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"a" * (80 * 1024)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.settimeout(10)
    got = b""
    try:
        try:
            sock.sendall((request("GET", "/healthz", {}) if after_a_request else b"") + endless)
        except OSError:
            pass  # refused while sending: the answer is in the receive buffer
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except OSError:
            pass  # reset after the answer
    finally:
        sock.close()
    # The refusal may overtake the first request's answer (it closes the connection).
    if after_a_request and got.startswith(b"HTTP/1.1 200"):
        got = got[got.index(b'{"status":"ok"}') + len(b'{"status":"ok"}'):]
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), got[:300]
    assert json.loads(body)["error"]["code"] == "headers_too_large"
