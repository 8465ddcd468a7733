"""No credential in any log (issue 11): uvicorn's access and WebSocket lines go through
paystream's JSON formatter with `token` values redacted.  A server with its access log on
is given tokens, the API key and signed webhooks on every endpoint, by query and by
header; its complete output is then read, and holds none of them."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from paystream.dev import trigger
from tests.conftest import Server
from tests.support import Paystream

pytestmark = pytest.mark.e2e


async def test_the_whole_output_holds_no_token_key_or_secret_and_is_json(database_url: str) -> None:
    server = Server(database_url, {"PAYSTREAM_SSE_PING": "1"})
    server.args = ("--access-log",)
    await asyncio.to_thread(server.start)
    used: list[str] = []
    try:
        async with Paystream(server) as ps:
            pi = trigger.stripe_id("pi_")
            await ps.deliver(ps.event("payment_intent.processing", pi))
            minted = await ps.http.post("/v1/stream-tokens", headers=ps.backend, json={"transaction_ids": [pi]})
            token = minted.json()["token"]
            local = ps.token(pi)
            used += [token, local]
            bearer = {"Authorization": f"Bearer {token}"}
            async with ps.sse(pi, token=local) as stream:  # ?token=
                await stream.event()
            async with ps.http.stream("GET", f"/v1/transactions/{pi}/events", headers=bearer) as resp:
                assert resp.status_code == 200
            await ps.http.get(f"/v1/transactions/{pi}", params={"token": local})
            await ps.http.get(f"/v1/transactions/{pi}", params={"await": "succeeded", "timeout": "0"}, headers=bearer)
            await ps.http.post(f"/v1/transactions/{pi}/refresh", params={"token": local})
            await ps.http.post("/v1/transactions", params={"token": server.api_key}, json={"kind": "payment"})
            await ps.http.get(f"/v1/transactions/{pi}", params={"token": "eyJhbGciOiJIUzI1NiJ9.e30.forged"})
            url = server.base_url.replace("http", "ws") + "/v1/ws"
            async with websockets.connect(f"{url}?token={local}") as ws:
                await ws.send(json.dumps({"op": "subscribe", "id": pi}))
                await asyncio.wait_for(ws.recv(), 10)
            async with websockets.connect(url) as ws:
                await ws.send(json.dumps({"op": "auth", "token": token}))
                await ws.send(json.dumps({"op": "subscribe", "id": pi}))
                await asyncio.wait_for(ws.recv(), 10)
            await ps.deliver(ps.event("payment_intent.succeeded", pi))
    finally:
        server.stop()
    output = server.log_path.read_text()
    secrets = [*used, server.api_key, server.webhook_secret, server.rotated_secret, server.token_secret,
               "eyJhbGciOiJIUzI1NiJ9.e30.forged"]
    leaked = [s[:12] + "…" for s in secrets if s in output]
    assert leaked == [], f"credentials in the server's output: {leaked}"
    lines = [line for line in output.splitlines() if line.strip()]
    assert any('"uvicorn.access"' in line and "token=[redacted]" in line for line in lines)
    not_json = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            not_json.append(line)
    assert not_json == [], not_json[:3]
