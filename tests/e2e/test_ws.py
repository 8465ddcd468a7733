"""GET /v1/ws: several transactions on one socket, same ordering and resume rules as SSE."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import websockets

from paystream.dev import trigger
from tests.support import Paystream

pytestmark = pytest.mark.e2e


async def new_txn(ps: Paystream, status: str = "processing") -> str:
    pi = trigger.stripe_id("pi_")
    await ps.deliver(ps.event(f"payment_intent.{status}", pi, created=int(time.time()) - 60))
    return pi


def ws_url(ps: Paystream, token: str) -> str:
    return ps.server.base_url.replace("http", "ws") + f"/v1/ws?token={token}"


async def recv(ws: websockets.ClientConnection) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


async def test_several_transactions_on_one_socket(ps: Paystream) -> None:
    a, b = await new_txn(ps), await new_txn(ps, "requires_action")
    async with websockets.connect(ws_url(ps, ps.token(a, b))) as ws:
        await ws.send(json.dumps({"op": "subscribe", "id": a}))
        await ws.send(json.dumps({"op": "subscribe", "id": b}))
        snaps = [await recv(ws), await recv(ws)]
        assert {(s["op"], s["id"], s["seq"]) for s in snaps} == {("snapshot", a, 1), ("snapshot", b, 1)}
        await ps.deliver(ps.event("payment_intent.succeeded", b))
        msg = await recv(ws)
        assert (msg["op"], msg["id"], msg["seq"], msg["data"]["status"]) == ("status", b, 2, "succeeded")
        assert msg["data"]["previous_status"] == "requires_action"
        await ps.deliver(ps.event("payment_intent.succeeded", a))
        msg = await recv(ws)
        assert (msg["id"], msg["seq"], msg["data"]["status"]) == (a, 2, "succeeded")


async def test_after_replays_missed_events_then_goes_live(ps: Paystream) -> None:
    pi = await new_txn(ps, "created")
    now = int(time.time())
    await ps.deliver(ps.event("payment_intent.requires_action", pi, created=now))
    async with websockets.connect(ws_url(ps, ps.token(pi))) as ws:
        await ws.send(json.dumps({"op": "subscribe", "id": pi, "after": 0}))
        got = [await recv(ws), await recv(ws)]
        assert [(m["op"], m["seq"]) for m in got] == [("status", 1), ("status", 2)]
        await ps.deliver(ps.event("payment_intent.succeeded", pi, created=now + 1))
        assert (await recv(ws))["seq"] == 3


async def test_unsubscribe_stops_pushes(ps: Paystream) -> None:
    a, b = await new_txn(ps), await new_txn(ps)
    async with websockets.connect(ws_url(ps, ps.token(a, b))) as ws:
        for pi in (a, b):
            await ws.send(json.dumps({"op": "subscribe", "id": pi}))
            await recv(ws)
        await ws.send(json.dumps({"op": "unsubscribe", "id": a}))
        # Unsubscribe has no answer: one that does, after it, says it was handled (a socket's
        # messages are handled in order).
        await ws.send(json.dumps({"op": "subscribe", "id": trigger.stripe_id("pi_")}))  # not the token's
        assert (await recv(ws))["op"] == "error"
        await ps.deliver(ps.event("payment_intent.succeeded", a))
        await ps.deliver(ps.event("payment_intent.succeeded", b))
        msg = await recv(ws)  # the next push is b's: a's was not sent
        assert msg["id"] == b


async def test_errors_are_per_subscription(ps: Paystream) -> None:
    mine = await new_txn(ps)
    other = await new_txn(ps)
    missing = "txn_01JZZZZZZZZZZZZZZZZZZZZZZZ"
    async with websockets.connect(ws_url(ps, ps.token(mine, missing))) as ws:
        await ws.send(json.dumps({"op": "subscribe", "id": other}))
        assert (await recv(ws))["code"] == "forbidden"
        await ws.send(json.dumps({"op": "subscribe", "id": missing}))
        assert (await recv(ws))["code"] == "not_found"
        await ws.send(json.dumps({"op": "subscribe", "id": mine, "after": -1}))
        assert (await recv(ws))["code"] == "bad_request"
        await ws.send("{not json")
        assert (await recv(ws))["code"] == "bad_request"
        await ws.send(json.dumps({"op": "subscribe", "id": mine}))
        assert (await recv(ws))["op"] == "snapshot"  # the socket survived every error


async def test_a_bad_token_is_refused_at_the_handshake(ps: Paystream) -> None:
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(ws_url(ps, "nope")):
            pass
    assert info.value.response.status_code == 401


async def test_no_compression_is_negotiated(ps: Paystream) -> None:
    """Browsers offer permessage-deflate; for ~300-byte status messages its zlib state
    (~50 KB a socket) costs more than it saves, so the server declines it."""
    a = await new_txn(ps)
    async with websockets.connect(ws_url(ps, ps.token(a))) as ws:  # offers deflate by default
        assert "permessage-deflate" in ws.request.headers.get("Sec-WebSocket-Extensions", "")
        assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
        await ws.send(json.dumps({"op": "subscribe", "id": a}))
        assert (await recv(ws))["op"] == "snapshot"
