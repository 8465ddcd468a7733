"""Cross-origin browsers (issue 11): CORS by an allow-list, the WebSocket's Origin check,
and the end of a plain EventSource (204 once it has seen a final status)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest
import websockets

from paystream.dev import trigger
from tests.conftest import Server
from tests.support import Paystream

pytestmark = pytest.mark.e2e

SHOP = "http://shop.example:9000"


@pytest.fixture(scope="module")
def cors_server(database_url: str) -> Iterator[Server]:
    server = Server(database_url, {"PAYSTREAM_ALLOWED_ORIGINS": f"{SHOP}, http://localhost:*"}).start()
    yield server
    server.stop()


@pytest.fixture
async def shop(cors_server: Server) -> Paystream:
    async with Paystream(cors_server) as client:
        yield client


def _cors_headers(resp: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k.startswith("access-control-")}


@pytest.mark.parametrize("path", ["/v1/transactions/txn_x/events", "/v1/transactions/txn_x",
                                  "/v1/transactions/txn_x/refresh"])
async def test_a_preflight_from_an_allowed_origin_names_what_the_sdk_sends(shop: Paystream, path: str) -> None:
    for origin in (SHOP, "http://localhost:5173"):
        resp = await shop.http.options(path, headers={
            "Origin": origin, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization,last-event-id"})
        assert resp.status_code == 204
        assert resp.headers["access-control-allow-origin"] == origin
        assert resp.headers["vary"] == "Origin"
        allowed = {h.strip().lower() for h in resp.headers["access-control-allow-headers"].split(",")}
        assert {"authorization", "last-event-id", "content-type"} <= allowed
        assert {"GET", "POST"} <= {m.strip() for m in resp.headers["access-control-allow-methods"].split(",")}


async def test_any_other_origin_gets_no_cors_headers_at_all(shop: Paystream) -> None:
    for origin in ("http://evil.example", "http://shop.example:9001", "http://localhost.evil:80"):
        pre = await shop.http.options("/v1/transactions/txn_x/events", headers={
            "Origin": origin, "Access-Control-Request-Method": "GET"})
        assert pre.status_code == 403 and _cors_headers(pre) == {}
        assert pre.json()["error"]["code"] == "origin_not_allowed"
        get = await shop.http.get("/healthz", headers={"Origin": origin})
        assert get.status_code == 200 and _cors_headers(get) == {}


async def test_every_response_to_an_allowed_origin_carries_it_streams_included(shop: Paystream) -> None:
    pi = trigger.stripe_id("pi_")
    await shop.deliver(shop.event("payment_intent.processing", pi))
    headers = {"Origin": SHOP, "Authorization": f"Bearer {shop.token(pi)}", "Accept": "text/event-stream"}
    async with shop.http.stream("GET", f"/v1/transactions/{pi}/events", headers=headers) as resp:
        assert resp.status_code == 200
        assert resp.headers["access-control-allow-origin"] == SHOP and resp.headers["vary"] == "Origin"
    refused = await shop.http.get(f"/v1/transactions/{pi}", headers={"Origin": SHOP})  # no token: 401
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == SHOP


async def test_a_websocket_handshake_from_an_origin_not_allowed_is_refused_403(shop: Paystream) -> None:
    pi = trigger.stripe_id("pi_")
    url = shop.server.base_url.replace("http", "ws") + f"/v1/ws?token={shop.token(pi)}"
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(url, origin="http://evil.example"):
            pass
    assert refused.value.response.status_code == 403
    async with websockets.connect(url, origin=SHOP) as ws:  # allowed
        await ws.send(json.dumps({"op": "subscribe", "id": pi}))
        assert "error" in await asyncio.wait_for(ws.recv(), 10)  # not_found: but it was accepted
    async with websockets.connect(url) as ws:  # no Origin: a server-side client
        await ws.send(json.dumps({"op": "subscribe", "id": pi}))
        assert await asyncio.wait_for(ws.recv(), 10)


async def test_a_reconnect_past_a_final_status_is_204_so_eventsource_stops(ps: Paystream) -> None:
    pi = trigger.stripe_id("pi_")
    t = int(time.time()) - 5
    await ps.deliver(ps.event("payment_intent.processing", pi, created=t))
    await ps.deliver(ps.event("payment_intent.succeeded", pi, created=t + 1))
    seq = (await ps.get(pi)).json()["seq"]
    query = {"token": ps.token(pi)}
    done = await ps.http.get(f"/v1/transactions/{pi}/events", params=query, headers={"Last-Event-ID": str(seq)})
    assert done.status_code == 204 and done.content == b""
    earlier = await ps.http.get(f"/v1/transactions/{pi}/events", params=query,
                                headers={"Last-Event-ID": str(seq - 1)})
    assert earlier.status_code == 200 and "event: status" in earlier.text  # what it missed, then the end
    follow = {**query, "follow": "true"}
    async with ps.http.stream("GET", f"/v1/transactions/{pi}/events", params=follow,
                              headers={"Last-Event-ID": str(seq)}) as resp:
        assert resp.status_code == 200  # follow=true keeps watching past the end
