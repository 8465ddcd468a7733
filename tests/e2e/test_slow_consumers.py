"""Clients that never read (issue 22, items 10 and 11): cut off must mean gone.

Twenty SSE and twenty WebSocket clients open their streams on one transaction from raw
sockets with a small receive buffer, and never read a byte; large events are pushed until
every one of their subscriptions has overflowed.  Before, an SSE stream gave back its lease
but kept its TCP connection, with megabytes queued for it, and logged two ERROR
tracebacks; a WebSocket stayed open and counted for good.  Now each is closed within a few
seconds of its cut-off (aborted, as it takes nothing), the server's connections, stream
gauges and memory return to where they were, the per-address stream count is free again,
and each cut-off is one WARNING line naming the transaction, with no traceback.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from collections.abc import Iterator

import psutil
import pytest
import websockets

from paystream.dev import trigger
from tests.conftest import Server
from tests.support import Paystream, wait_until

pytestmark = pytest.mark.e2e

CLIENTS = 20  # of each kind


@pytest.fixture(scope="module")
def own_server(database_url: str) -> Iterator[Server]:
    """A server of its own, so its connections, memory and log are this module's alone.
    A small subscriber buffer makes the silent clients overflow after a few events; the
    address may hold exactly the 2 × CLIENTS streams, so a leaked one shows as a 429."""
    srv = Server(database_url, {"PAYSTREAM_SUBSCRIBER_BUFFER": "65536",
                                "PAYSTREAM_MAX_STREAMS_PER_ADDRESS": str(2 * CLIENTS)}).start()
    yield srv
    srv.stop()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def established(pid: int, port: int) -> int:
    """Client connections the server process holds open on its public port."""
    return sum(1 for conn in psutil.Process(pid).net_connections(kind="tcp")
               if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_ESTABLISHED)


def server_side_left(port: int, clients: list[socket.socket]) -> list[str]:
    """The server's ends of these clients' connections that the kernel still holds, in any
    state: a socket closed with data unsent lingers (FIN-WAIT, its buffers held) until
    the data is taken, which from these clients is never."""
    ports = {sock.getsockname()[1] for sock in clients}
    return [conn.status for conn in psutil.net_connections(kind="tcp")
            if conn.laddr and conn.laddr.port == port and conn.raddr and conn.raddr.port in ports]


def silent_socket(port: int, request: bytes) -> socket.socket:
    """A client that sends its request and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request)
    return sock


def masked_text_frame(text: str) -> bytes:
    payload = text.encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def silent_sse(port: int, pi: str, token: str) -> socket.socket:
    return silent_socket(port, f"GET /v1/transactions/{pi}/events?token={token}&follow=true HTTP/1.1\r\n"
                               f"Host: x\r\nAccept: text/event-stream\r\n\r\n".encode())


def silent_ws(port: int, token: str) -> socket.socket:
    """The handshake only: bytes after it in the same read would go to the HTTP parser."""
    key = base64.b64encode(os.urandom(16)).decode()
    return silent_socket(port, f"GET /v1/ws?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                               f"Sec-WebSocket-Version: 13\r\n\r\n".encode())


async def metric(ps: Paystream, name: str) -> float:
    text = (await ps.http.get("/metrics")).text
    # A labelled gauge has no line before its first use: zero.
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)), 0.0)


async def test_clients_that_never_read_are_disconnected_and_forgotten(own_server: Server) -> None:
    assert own_server.proc is not None
    pid, port = own_server.proc.pid, own_server.port
    async with Paystream(own_server) as ps:
        # ~20 KB per event (40 metadata values of 500 bytes, as Stripe allows).
        metadata = {f"k{i:02d}": "v" * 500 for i in range(40)}
        pi = trigger.stripe_id("pi_")
        await ps.deliver(ps.event("charge.refunded", pi, amount=10**9, amount_refunded=1, metadata=metadata,
                                  created=int(time.time()) - 100))
        await ps.http.get("/metrics")
        baseline_connections = established(pid, port)
        baseline_rss = rss_mb(pid)
        overflows = await metric(ps, "paystream_subscriber_overflows_total ")

        # Each its own token: a token holds at most 20 streams.
        sse_clients = [silent_sse(port, pi, ps.token(pi, f"sse{i}")) for i in range(CLIENTS)]
        ws_clients = [silent_ws(port, ps.token(pi, f"ws{i}")) for i in range(CLIENTS)]
        clients = sse_clients + ws_clients
        try:
            async def all_open() -> bool:
                return (await metric(ps, 'paystream_connections{transport="sse"}') == CLIENTS
                        and await metric(ps, 'paystream_connections{transport="ws"}') == CLIENTS)

            await wait_until(all_open, timeout=30, what="the silent clients' streams to open")
            for sock in ws_clients:  # accepted: now a WebSocket's own frame
                sock.sendall(masked_text_frame(json.dumps({"op": "subscribe", "id": pi})))
            assert established(pid, port) >= baseline_connections + 2 * CLIENTS

            # Push until every silent subscription has overflowed (each takes a few events).
            peak_rss = baseline_rss
            refunded = 1
            for _ in range(400):
                if await metric(ps, "paystream_subscriber_overflows_total ") >= overflows + 2 * CLIENTS:
                    break
                refunded += 1
                await ps.deliver(ps.event("charge.refunded", pi, amount=10**9, amount_refunded=refunded,
                                          metadata=metadata))
                peak_rss = max(peak_rss, rss_mb(pid))
            assert await metric(ps, "paystream_subscriber_overflows_total ") >= overflows + 2 * CLIENTS
            cut_at = time.monotonic()

            # Closed: a few seconds for their last bytes (streams.CLOSE_GRACE, 5 s), then aborted.
            async def all_gone() -> bool:
                return (established(pid, port) <= baseline_connections and server_side_left(port, clients) == []
                        and await metric(ps, 'paystream_connections{transport="sse"}') == 0
                        and await metric(ps, 'paystream_connections{transport="ws"}') == 0)

            await wait_until(all_gone, timeout=20, what="the silent clients' connections to be closed")
            took = time.monotonic() - cut_at
            # From the clients' side too: none of their connections is open any more.
            fds = {sock.fileno() for sock in clients}
            assert [conn for conn in psutil.Process().net_connections(kind="tcp")
                    if conn.fd in fds and conn.status == psutil.CONN_ESTABLISHED] == []
        finally:
            for sock in clients:
                sock.close()

        # What was queued for them is given back (the kernel's buffers went with the sockets).
        async def memory_back() -> bool:
            return rss_mb(pid) <= baseline_rss + 25

        await wait_until(memory_back, timeout=20, what=f"RSS back near {baseline_rss:.0f} MB")
        print(f"cut off -> closed in {took:.1f} s; RSS {baseline_rss:.0f} -> peak {peak_rss:.0f} -> "
              f"{rss_mb(pid):.0f} MB")

        # The address's stream count is free again: as many streams as it may hold open at once.
        async def one_sse(i: int) -> str | None:
            async with ps.sse(pi, token=ps.token(pi, f"again{i}"), params={"follow": "true"}) as stream:
                frame = await stream.event()
                return frame.event if frame else None

        async def one_ws(i: int) -> str:
            url = own_server.base_url.replace("http", "ws") + f"/v1/ws?token={ps.token(pi, f'wsagain{i}')}"
            async with websockets.connect(url) as ws:
                await ws.send(json.dumps({"op": "subscribe", "id": pi}))
                return json.loads(await asyncio.wait_for(ws.recv(), 15))["op"]

        again = await asyncio.gather(*[one_sse(i) for i in range(CLIENTS)], *[one_ws(i) for i in range(CLIENTS)])
        assert again == ["snapshot"] * (2 * CLIENTS)

    # One line per cut-off stream, naming its transaction; no traceback, no error.
    entries = [json.loads(line) for line in own_server.log_path.read_text().splitlines() if line.startswith("{")]
    cut = [e for e in entries if "cut off" in e["msg"]]
    sse_lines = [e for e in cut if e["logger"] == "paystream.sse"]
    ws_lines = [e for e in cut if e["logger"] == "paystream.ws"]
    assert len(sse_lines) == CLIENTS and len(ws_lines) == CLIENTS, [e["msg"] for e in cut]
    assert all(e["level"] == "warning" and e.get("transaction_id", "").startswith("txn_") for e in cut)
    assert all("too far behind" in e["msg"] for e in cut)
    assert [e for e in entries if "exc" in e or e["level"] in ("error", "critical")] == []
