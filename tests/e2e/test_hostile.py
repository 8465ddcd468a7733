"""Slow and hostile clients: cut off, limited, refused — and nothing stored is touched."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from paystream.dev import trigger
from tests.conftest import Server
from tests.support import Paystream, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tight(database_url: str) -> Server:
    """A server with small limits, so tests reach them quickly."""
    srv = Server(database_url, {"PAYSTREAM_MAX_STREAMS_PER_TOKEN": "2", "PAYSTREAM_MAX_STREAMS_PER_ADDRESS": "4",
                                "PAYSTREAM_SUBSCRIBER_BUFFER": "65536"}).start()
    yield srv
    srv.stop()


@pytest.fixture
async def tps(tight: Server) -> AsyncIterator[Paystream]:
    async with Paystream(tight) as client:
        yield client


async def new_txn(ps: Paystream, **kw: object) -> str:
    pi = trigger.stripe_id("pi_")
    await ps.deliver(ps.event("payment_intent.succeeded", pi, created=int(time.time()) - 100, **kw))
    return pi


async def test_streams_are_limited_per_token_and_per_address(tps: Paystream) -> None:
    a = await new_txn(tps)
    token = tps.token(a)
    async with tps.sse(a, token=token, params={"follow": "true"}) as s1, \
               tps.sse(a, token=token, params={"follow": "true"}) as s2:
        await s1.event(), await s2.event()
        third = await tps.http.get(f"/v1/transactions/{a}/events", params={"token": token})
        assert third.status_code == 429 and third.json()["error"]["code"] == "too_many_streams"
        async with tps.sse(a, token=tps.token(a, "x"), params={"follow": "true"}) as s3, \
                   tps.sse(a, token=tps.token(a, "y"), params={"follow": "true"}) as s4:
            await s3.event(), await s4.event()
            fifth = await tps.http.get(f"/v1/transactions/{a}/events", params={"token": tps.token(a, "z")})
            assert fifth.status_code == 429 and "address" in fifth.json()["error"]["message"]
    # closed streams are released, once the server has seen their clients leave
    async def released() -> bool:
        text = (await tps.http.get("/metrics", headers=tps.backend)).text
        return 'paystream_connections{transport="sse"} 0.0' in text

    await wait_until(released, timeout=10, what="the closed streams to be released")
    async with tps.sse(a, token=token, params={"follow": "true"}) as again:
        assert (await again.event()).event == "snapshot"


async def test_head_on_a_stream_holds_nothing(tps: Paystream) -> None:
    """HEAD answers what GET would, headers only, and releases what it took: a third and
    fourth HEAD, then two real streams, still fit in the token's two slots."""
    a = await new_txn(tps)
    token = tps.token(a)
    for _ in range(4):
        head = await tps.http.head(f"/v1/transactions/{a}/events", params={"token": token})
        assert head.status_code == 200 and head.headers["content-type"].startswith("text/event-stream")
        assert head.content == b""
    async with tps.sse(a, token=token, params={"follow": "true"}) as s1, \
               tps.sse(a, token=token, params={"follow": "true"}) as s2:
        assert (await s1.event()).event == "snapshot" and (await s2.event()).event == "snapshot"


async def test_oversized_headers_get_431(ps: Paystream) -> None:
    resp = await ps.http.get("/healthz", headers={"X-Big": "x" * 20000})
    assert resp.status_code == 431 and resp.json()["error"]["code"] == "headers_too_large"


async def test_a_reader_that_stops_reading_is_cut_off_and_can_resume(tps: Paystream) -> None:
    # ~20 KB per event (40 metadata values of 500 bytes) fills buffers quickly.
    metadata = {f"k{i:02d}": "v" * 500 for i in range(40)}
    pi = await new_txn(tps, metadata=metadata, amount=100000)
    token = tps.token(pi)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and then never read
    sock.connect(("127.0.0.1", tps.server.port))
    sock.sendall(f"GET /v1/transactions/{pi}/events?token={token}&follow=true HTTP/1.1\r\n"
                 f"Host: x\r\n\r\n".encode())

    async def overflows() -> float:
        text = (await tps.http.get("/metrics")).text
        return next(float(line.split()[1]) for line in text.splitlines()
                    if line.startswith("paystream_subscriber_overflows_total "))

    before = await overflows()
    refunded = 0
    for _ in range(600):  # the server must give up on this reader well before the end
        refunded += 100
        await tps.deliver(tps.event("charge.refunded", pi, amount=100000, amount_refunded=refunded,
                                    metadata=metadata))
        if refunded % 2000 == 0 and await overflows() > before:
            break
    assert await overflows() > before, "the silent reader was never cut off"
    sock.close()
    async with tps.sse(pi, token=token, params={"last_event_id": "1", "follow": "true"}) as stream:
        first = await stream.event()
    assert first.id == "2"  # resumes from its cursor with nothing missing


async def test_secrets_never_reach_logs_or_error_bodies(ps: Paystream) -> None:
    srv = ps.server
    bodies = [
        (await ps.send(ps.event("payment_intent.succeeded", "pi_x"), secret="whsec_wrong")).text,
        (await ps.http.get("/v1/transactions/pi_x", headers={"Authorization": f"Bearer {srv.api_key}x"})).text,
        (await ps.http.get("/v1/transactions/pi_x/events", params={"token": ps.token("pi_x") + "x"})).text,
        (await ps.http.post("/v1/transactions", json={"kind": "?"}, headers=ps.backend)).text,
    ]
    log = srv.log_path.read_text()
    for secret in (srv.webhook_secret, srv.rotated_secret, srv.api_key, srv.token_secret):
        assert secret not in log
        assert not any(secret in body for body in bodies)


async def test_a_failed_event_is_kept_listed_and_reprocessed(ps: Paystream, db: asyncpg.Connection) -> None:
    pi = trigger.stripe_id("pi_")
    # Stand-in for a bug: the database refuses this one object until "fixed".
    await db.execute(f"""CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF NEW.stripe_id = '{pi}' THEN RAISE EXCEPTION 'simulated bug'; END IF; RETURN NEW; END $$""")
    await db.execute("CREATE TRIGGER test_refuse BEFORE INSERT ON transactions FOR EACH ROW EXECUTE FUNCTION test_refuse()")
    try:
        event = ps.event("payment_intent.succeeded", pi)
        resp = await ps.send(event)
        assert resp.status_code == 500 and "simulated" not in resp.text
        row = await db.fetchrow("SELECT outcome, error, processed_at FROM stripe_events WHERE id = $1", event["id"])
        assert (row["outcome"], row["processed_at"]) == ("failed", None) and "simulated bug" in row["error"]
    finally:
        await db.execute("DROP TRIGGER test_refuse ON transactions; DROP FUNCTION test_refuse()")
    env = {"DATABASE_URL": ps.server.database_url, "PATH": "/usr/bin:/bin"}
    listed = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "paystream", "events", "failed"],
                                     env=env, capture_output=True, text=True, timeout=60)
    assert event["id"] in listed.stdout
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "paystream", "events", "--reprocess",
                                                    "--id", event["id"]], env=env, capture_output=True, text=True,
                                   timeout=60)
    assert done.returncode == 0 and '"outcome": "applied"' in done.stdout, done.stderr
    assert (await ps.get(pi)).json()["status"] == "succeeded"
    again = await ps.deliver(event)  # Stripe's retry now finds it processed
    assert again["outcome"] == "duplicate"
