"""A WebSocket's token expires with it (issue 14): close 4001 at `exp`, and
{"op":"auth"} renews it on the open socket."""

from __future__ import annotations

import asyncio
import json
import time

import jwt
import pytest
import websockets

from paystream.dev import trigger
from tests.support import Paystream

pytestmark = pytest.mark.e2e


async def new_txn(ps: Paystream) -> str:
    pi = trigger.stripe_id("pi_")
    await ps.deliver(ps.event("payment_intent.processing", pi, created=int(time.time()) - 60))
    return pi


def ws_url(ps: Paystream, token: str) -> str:
    return ps.server.base_url.replace("http", "ws") + f"/v1/ws?token={token}"


async def recv(ws: websockets.ClientConnection, timeout: float = 10) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


def short_token(ps: Paystream, *ids: str, seconds: float = 3) -> tuple[str, float]:
    """A token expiring `seconds` from now, give or take the whole second `exp` is in
    (so 2-3 s by default: room for a handshake and a few messages on a busy machine)."""
    token = ps.token(*ids, ttl=int(seconds))
    return token, float(jwt.decode(token, options={"verify_signature": False})["exp"])


async def test_the_socket_closes_with_4001_when_its_token_expires(ps: Paystream) -> None:
    """Before: the grant was checked once at the handshake, so the socket kept
    subscribing and receiving long after `exp`."""
    pi = await new_txn(ps)
    token, exp = short_token(ps, pi)
    async with websockets.connect(ws_url(ps, token)) as ws:
        await ws.send(json.dumps({"op": "subscribe", "id": pi}))
        assert (await recv(ws))["op"] == "snapshot"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await recv(ws, timeout=exp - time.time() + 3)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
        assert time.time() >= exp - 0.05


async def test_auth_renews_the_token_and_moves_the_expiry(ps: Paystream) -> None:
    pi = await new_txn(ps)
    token, exp = short_token(ps, pi, seconds=6)  # room for four messages before it expires
    async with websockets.connect(ws_url(ps, token)) as ws:
        await ws.send(json.dumps({"op": "subscribe", "id": pi}))
        assert (await recv(ws))["op"] == "snapshot"
        await ws.send(json.dumps({"op": "auth", "token": "not-a-token"}))
        refused = await recv(ws)
        assert (refused["op"], refused["code"]) == ("error", "unauthorized")
        await ws.send(json.dumps({"op": "auth", "token": ps.token(pi, ttl=3600)}))
        await asyncio.sleep(max(0.0, exp - time.time()) + 1.5)  # past the first token's exp
        await ps.deliver(ps.event("payment_intent.succeeded", pi))
        pushed = await recv(ws)  # still open, still subscribed
        assert (pushed["op"], pushed["data"]["status"]) == ("status", "succeeded")
        other = await new_txn(ps)
        await ws.send(json.dumps({"op": "subscribe", "id": other}))  # the new grant, not more
        assert (await recv(ws))["code"] == "forbidden"


async def test_auth_with_a_narrower_token_unsubscribes_what_it_no_longer_covers(ps: Paystream) -> None:
    kept, dropped = await new_txn(ps), await new_txn(ps)
    async with websockets.connect(ws_url(ps, ps.token(kept, dropped))) as ws:
        for pi in (kept, dropped):
            await ws.send(json.dumps({"op": "subscribe", "id": pi}))
            assert (await recv(ws))["op"] == "snapshot"
        await ws.send(json.dumps({"op": "auth", "token": ps.token(kept)}))
        error = await recv(ws)
        assert (error["op"], error["id"], error["code"]) == ("error", dropped, "forbidden")
        await ps.deliver(ps.event("payment_intent.succeeded", dropped))
        await ps.deliver(ps.event("payment_intent.succeeded", kept))
        pushed = await recv(ws)  # the next push is kept's: dropped's was not sent
        assert (pushed["id"], pushed["data"]["status"]) == (kept, "succeeded")


async def test_an_expired_token_cannot_renew(ps: Paystream) -> None:
    pi = await new_txn(ps)
    async with websockets.connect(ws_url(ps, ps.token(pi))) as ws:
        await ws.send(json.dumps({"op": "auth", "token": ps.token(pi, ttl=-10)}))
        refused = await recv(ws)
        assert (refused["code"], "expired" in refused["message"]) == ("unauthorized", True)
        await ws.send(json.dumps({"op": "auth"}))
        assert (await recv(ws))["code"] == "bad_request"
        await ws.send(json.dumps({"op": "subscribe", "id": pi}))
        assert (await recv(ws))["op"] == "snapshot"  # the old grant still holds


async def test_a_socket_may_send_its_token_first_instead_of_in_the_url(ps: Paystream) -> None:
    """The token stays out of URLs (and so out of proxies' logs): the SDK opens /v1/ws bare
    and sends {"op":"auth"} first."""
    pi = await new_txn(ps)
    bare = ps.server.base_url.replace("http", "ws") + "/v1/ws"
    async with websockets.connect(bare) as ws:
        await ws.send(json.dumps({"op": "subscribe", "id": pi}))
        early = await recv(ws)
        assert (early["op"], early["id"], early["code"]) == ("error", pi, "unauthorized")
        await ws.send(json.dumps({"op": "auth", "token": ps.token(pi)}))
        await ws.send(json.dumps({"op": "subscribe", "id": pi}))
        assert (await recv(ws))["op"] == "snapshot"
        await asyncio.sleep(5.5)  # past the window for the first auth: it came in time
        await ps.deliver(ps.event("payment_intent.succeeded", pi))
        assert (await recv(ws))["data"]["status"] == "succeeded"


@pytest.mark.parametrize("first", [None, "not-a-token"])
async def test_a_bare_socket_without_a_good_first_auth_is_closed_with_4001(ps: Paystream,
                                                                            first: str | None) -> None:
    bare = ps.server.base_url.replace("http", "ws") + "/v1/ws"
    started = time.monotonic()
    async with websockets.connect(bare) as ws:
        if first is not None:
            await ws.send(json.dumps({"op": "auth", "token": first}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await recv(ws, timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
    took = time.monotonic() - started
    assert (4.5 < took < 10) if first is None else took < 5, took
