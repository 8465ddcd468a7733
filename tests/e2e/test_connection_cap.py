"""Open connections are capped per client address, and descriptors are kept for the
database and health checks (issue 22, item 12).

Before, 150 idle connections from one address under a file limit of 96 took every
descriptor: `/readyz` failed for about 10 s (until the header deadline closed them), and so
did the database pool's reconnects.  Each test opens its idle connections with half a
request head sent (a client holding a connection, as a slow or hostile one does), with the
header deadline far away, so only the cap or the reserve can close them."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator

import pytest
import websockets

from paystream.dev import trigger
from tests.conftest import ARTIFACTS
from tests.harness import Server
from tests.support import Paystream, wait_until

pytestmark = pytest.mark.e2e

HALF_A_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
SLOW = {"PAYSTREAM_HEADER_TIMEOUT": "120"}  # idle connections are closed by the cap, not the deadline
CAP = 20
PROXY = "127.0.0.3"  # a trusted load balancer: its connections carry many clients


@pytest.fixture(scope="module")
def capped(database_url: str) -> Iterator[Server]:
    srv = Server(database_url, {**SLOW, "PAYSTREAM_MAX_CONNECTIONS_PER_ADDRESS": str(CAP),
                                "PAYSTREAM_TRUSTED_PROXIES": PROXY}, log_dir=ARTIFACTS).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def few_files(database_url: str) -> Iterator[Server]:
    """The review's server: the default cap, and a file limit of 96."""
    srv = Server(database_url, SLOW, log_dir=ARTIFACTS, file_limit=96).start()
    yield srv
    srv.stop()


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_idle(port: int, n: int, source: str = "127.0.0.1") -> list[Conn]:
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        writer.write(HALF_A_HEAD)
        conns.append((reader, writer))
    return conns


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict, bytes]:
    """One response (status, JSON body, and whatever followed it until the close or 10 s)."""
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        body = await reader.readexactly(length)
    return int(head.split(b" ", 2)[1]), json.loads(body), head


async def readyz(port: int, source: str = "127.0.0.2") -> int:
    """/readyz over a new connection from another client address."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, _body, _head = await answer(reader)
        return status
    finally:
        writer.close()


async def closed(reader: asyncio.StreamReader) -> bool:
    try:
        async with asyncio.timeout(10):
            return await reader.read() == b""
    except ConnectionResetError:
        return True


async def finish(conns: list[Conn]) -> list[tuple[int, dict, bytes]]:
    """Complete each connection's request and read its one answer."""
    for _reader, writer in conns:
        writer.write(b"\r\n")
    return list(await asyncio.gather(*(answer(r) for r, _w in conns)))


async def answer_or_reset(reader: asyncio.StreamReader) -> tuple[int, dict, bytes] | None:
    """The answer, or None if the connection was closed without one reaching us (a reset
    can overtake an answer written just before it)."""
    try:
        return await answer(reader)
    except (ConnectionError, asyncio.IncompleteReadError):
        return None


def close_all(conns: list[Conn]) -> None:
    for _reader, writer in conns:
        writer.close()


async def room_for(port: int, n: int, source: str = "127.0.0.1") -> bool:
    """`n` connections from `source` at once are all served."""
    conns = await open_idle(port, n, source)
    try:
        return all(status == 200 for status, _body, _head in await finish(conns))
    finally:
        close_all(conns)


async def test_connections_over_the_cap_from_one_address_are_refused_at_once(capped: Server) -> None:
    # An address of its own: the start-up's /readyz polls from 127.0.0.1 may still hold a slot.
    source = "127.0.0.5"
    conns = await open_idle(capped.port, CAP + 30, source)
    try:
        admitted, refused = conns[:CAP], conns[CAP:]
        # Refused before their requests were complete (the deadline is 120 s away): answered and closed.
        for status, body, head in await asyncio.gather(*(answer(r) for r, _w in refused)):
            assert status == 429 and body["error"]["code"] == "too_many_connections", body
            assert b"connection: close" in head.lower()
        assert all(await asyncio.gather(*(closed(r) for r, _w in refused)))
        assert await readyz(capped.port) == 200  # another address is not affected
        # The first CAP are served as usual.
        assert [(s, b) for s, b, _h in await finish(admitted)] == [(200, {"status": "ok"})] * CAP
    finally:
        close_all(conns)
    # Closed connections are released: the address may hold CAP again.
    await wait_until(lambda: room_for(capped.port, CAP, source), timeout=20,
                     what="the closed connections to be released")


async def test_websockets_count_until_they_close(capped: Server) -> None:
    """A WebSocket is a connection of its address while open (uvicorn hands the socket to
    another protocol at the upgrade), and is released when it closes."""
    async with Paystream(capped) as ps:
        pi = trigger.stripe_id("pi_")
        await ps.deliver(ps.event("payment_intent.processing", pi))
        url = capped.base_url.replace("http", "ws") + f"/v1/ws?token={ps.token(pi)}"
    source = "127.0.0.4"  # an address of its own: the other tests' closes may still be under way
    sockets = [await websockets.connect(url, local_addr=(source, 0)) for _ in range(CAP)]
    try:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(url, local_addr=(source, 0))
        assert refused.value.response.status_code == 429
    finally:
        for ws in sockets:
            await ws.close()
    await wait_until(lambda: room_for(capped.port, CAP, source), timeout=20,
                     what="the closed WebSockets to be released")


async def test_a_trusted_proxy_is_not_capped_by_its_own_address(capped: Server) -> None:
    """The proxy's connections carry many clients; their streams are limited per forwarded
    address instead (PAYSTREAM_MAX_STREAMS_PER_ADDRESS)."""
    conns = await open_idle(capped.port, CAP + 10, source=PROXY)
    try:
        assert [(s, b) for s, b, _h in await finish(conns)] == [(200, {"status": "ok"})] * (CAP + 10)
    finally:
        close_all(conns)


async def test_readyz_answers_throughout_while_one_address_holds_every_connection_it_can(few_files: Server) -> None:
    conns: list[Conn] = []
    try:
        for _ in range(15):
            conns += await open_idle(few_files.port, 10)
            assert await readyz(few_files.port) == 200, few_files.log_tail()
        for _reader, writer in conns:
            if not writer.is_closing():
                with contextlib.suppress(ConnectionError):
                    writer.write(b"\r\n")  # the rest of each request
        answers = await asyncio.gather(*(answer_or_reset(r) for r, _w in conns))
        served = [a for a in answers if a is not None and a[0] == 200]
        refused = [a for a in answers if a is None or a[0] != 200]
        # Some were served, the rest refused at once (503 server_busy, or closed), none left hanging.
        assert served and refused, (len(served), len(refused))
        assert all(body == {"status": "ok"} for _s, body, _h in served)
        for refusal in refused:
            if refusal is not None:
                status, body, _head = refusal
                assert status == 503 and body["error"]["code"] == "server_busy", body
        assert await readyz(few_files.port) == 200
    finally:
        close_all(conns)
    log = few_files.log_path.read_text()
    assert "Too many open files" not in log and "EMFILE" not in log
