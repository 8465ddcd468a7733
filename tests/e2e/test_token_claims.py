"""A stream token whose claims have the wrong types (issue 22, item 7): signed with the
right secret, so only the claims can refuse it.  `exp` as a string passed PyJWT (it reads
it with int()) and then broke the comparison with PAYSTREAM_MAX_TOKEN_TTL: 500 with a
traceback on every read and stream, and a WebSocket `auth` with it closed 1000.  Every
path must answer 401 unauthorized (a socket: close 4001)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import jwt
import pytest
import websockets

from paystream.dev import trigger
from tests.support import Paystream

pytestmark = pytest.mark.e2e


def claims_cases() -> list[Any]:
    soon = int(time.time()) + 600
    cases = {
        "exp-numeric-string": {"exp": str(soon), "txn": ["{pi}"]},
        "exp-word": {"exp": "soon", "txn": ["{pi}"]},
        "exp-bool": {"exp": True, "txn": ["{pi}"]},
        "exp-list": {"exp": [soon], "txn": ["{pi}"]},
        "nbf-numeric-string": {"exp": soon, "nbf": str(soon - 700), "txn": ["{pi}"]},
        "iat-numeric-string": {"exp": soon, "iat": str(soon - 700), "txn": ["{pi}"]},
        "txn-object": {"exp": soon, "txn": {"{pi}": True}},
        "txn-numbers": {"exp": soon, "txn": ["{pi}", 1]},
        "txn-nested": {"exp": soon, "txn": [["{pi}"]]},
        "cus-number": {"exp": soon, "cus": 5},
        "cus-list": {"exp": soon, "cus": ["cus_x"]},
    }
    return [pytest.param(claims, id=name) for name, claims in cases.items()]


def sign(ps: Paystream, claims: dict[str, Any], pi: str) -> str:
    filled = json.loads(json.dumps(claims).replace("{pi}", pi))
    return jwt.encode(filled, ps.server.token_secret, algorithm="HS256")


def refused(resp: httpx.Response) -> None:
    assert resp.status_code == 401, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json()["error"]["code"] == "unauthorized"


@pytest.fixture(scope="module")
def pi() -> str:
    return trigger.stripe_id("pi_")


@pytest.mark.parametrize("claims", claims_cases())
async def test_http_reads_and_streams_answer_401(ps: Paystream, pi: str, claims: dict[str, Any]) -> None:
    await ps.deliver(ps.event("payment_intent.processing", pi))
    token = sign(ps, claims, pi)
    bearer = {"Authorization": f"Bearer {token}"}
    refused(await ps.http.get(f"/v1/transactions/{pi}", params={"token": token}))
    refused(await ps.http.get(f"/v1/transactions/{pi}", headers=bearer))
    refused(await ps.http.get(f"/v1/transactions/{pi}", headers=bearer,
                              params={"await": "succeeded", "timeout": "5"}))  # long-poll
    refused(await ps.http.get(f"/v1/transactions/{pi}/events", params={"token": token},
                              headers={"Accept": "text/event-stream"}))
    refused(await ps.http.post(f"/v1/transactions/{pi}/refresh", headers=bearer))


@pytest.mark.parametrize("claims", claims_cases())
async def test_the_websocket_handshake_answers_401(ps: Paystream, pi: str, claims: dict[str, Any]) -> None:
    url = ps.server.base_url.replace("http", "ws") + f"/v1/ws?token={sign(ps, claims, pi)}"
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(url):
            pass
    assert info.value.response.status_code == 401
    assert json.loads(info.value.response.body)["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("claims", claims_cases())
async def test_a_websocket_auth_message_closes_4001(ps: Paystream, pi: str, claims: dict[str, Any]) -> None:
    bare = ps.server.base_url.replace("http", "ws") + "/v1/ws"
    async with websockets.connect(bare) as ws:
        await ws.send(json.dumps({"op": "auth", "token": sign(ps, claims, pi)}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001, closed.value


async def test_a_renewal_with_such_a_token_is_refused_and_the_socket_keeps_its_grant(ps: Paystream,
                                                                                     pi: str) -> None:
    await ps.deliver(ps.event("payment_intent.processing", pi))
    url = ps.server.base_url.replace("http", "ws") + f"/v1/ws?token={ps.token(pi)}"
    async with websockets.connect(url) as ws:
        bad = sign(ps, {"exp": str(int(time.time()) + 600), "txn": [pi]}, pi)
        await ws.send(json.dumps({"op": "auth", "token": bad}))
        answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert (answer["op"], answer["code"]) == ("error", "unauthorized")
        await ws.send(json.dumps({"op": "subscribe", "id": pi}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["op"] == "snapshot"


async def test_a_fractional_exp_is_a_number_and_accepted(ps: Paystream, pi: str) -> None:
    await ps.deliver(ps.event("payment_intent.processing", pi))
    token = sign(ps, {"exp": time.time() + 600.5, "txn": [pi]}, pi)
    assert (await ps.http.get(f"/v1/transactions/{pi}", params={"token": token})).status_code == 200
