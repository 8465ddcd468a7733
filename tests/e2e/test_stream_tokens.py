"""POST /v1/stream-tokens: the backend mints a token the browser streams with."""

from __future__ import annotations

import contextlib
import json
import time
from datetime import UTC, datetime

import jwt
import pytest
import websockets

from paystream.dev import trigger
from tests.support import Paystream

pytestmark = pytest.mark.e2e


async def test_a_minted_token_opens_what_it_names_and_nothing_else(ps: Paystream) -> None:
    pi, other = trigger.stripe_id("pi_"), trigger.stripe_id("pi_")
    for p in (pi, other):
        await ps.deliver(ps.event("payment_intent.processing", p, customer="cus_tok"))
    resp = await ps.http.post("/v1/stream-tokens", headers=ps.backend,
                              json={"transaction_ids": [pi], "ttl_seconds": 120})
    assert resp.status_code == 201
    body = resp.json()
    expires = datetime.strptime(body["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    assert 100 < expires - time.time() < 140
    async with ps.sse(pi, token=body["token"]) as stream:
        assert (await stream.event()).json["stripe_id"] == pi
    denied = await ps.http.get(f"/v1/transactions/{other}", params={"token": body["token"]})
    assert denied.status_code == 403
    by_customer = (await ps.http.post("/v1/stream-tokens", headers=ps.backend,
                                      json={"customer_id": "cus_tok"})).json()["token"]
    assert (await ps.http.get(f"/v1/transactions/{other}", params={"token": by_customer})).status_code == 200


@pytest.mark.parametrize("body", [{}, {"transaction_ids": "pi_x"}, {"customer_id": ""},
                                  {"transaction_ids": ["pi_x"], "ttl_seconds": 0},
                                  {"transaction_ids": ["pi_x"], "ttl_seconds": 999999}, {"surprise": 1}])
async def test_bad_token_requests_are_400(ps: Paystream, body: dict) -> None:
    resp = await ps.http.post("/v1/stream-tokens", headers=ps.backend, json=body)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "bad_request"


async def test_minting_needs_the_api_key(ps: Paystream) -> None:
    resp = await ps.http.post("/v1/stream-tokens", json={"transaction_ids": ["pi_x"]},
                              headers={"Authorization": f"Bearer {ps.token('pi_x')}"})
    assert resp.status_code == 401



async def test_another_spelling_of_a_token_shares_its_stream_limit(ps: Paystream) -> None:
    """The same JWT with `=` after its signature also verifies: the per-token limit counted
    the raw text, so each spelling had 20 streams of its own.  Now it counts the token."""
    pi = trigger.stripe_id("pi_")
    await ps.deliver(ps.event("payment_intent.processing", pi))
    token = ps.token(pi)
    streams = []  # held: a dropped reader's generator closes its response when collected
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(20):
            streams.append(await stack.enter_async_context(ps.sse(pi, token=token, params={"follow": "true"})))
            assert (await streams[-1].event()).event == "snapshot"
        for spelling in (token + "=", token):
            assert (await ps.http.get(f"/v1/transactions/{pi}", params={"token": spelling})).status_code == 200
            # headers only: before the fix this was a 21st stream, which never ends
            async with ps.http.stream("GET", f"/v1/transactions/{pi}/events", params={"token": spelling}) as refused:
                assert refused.status_code == 429
                assert json.loads(await refused.aread())["error"]["code"] == "too_many_streams"


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/stream-tokens"), ("POST", "/v1/transactions"),
                                              ("GET", "/v1/transactions/pi_x"),
                                              ("GET", "/v1/transactions/pi_x/events")])
async def test_the_api_key_is_refused_in_the_url(ps: Paystream, method: str, path: str) -> None:
    """The API key goes in the Authorization header only: a URL ends up in logs and histories."""
    body = {"transaction_ids": ["pi_x"]} if path == "/v1/stream-tokens" else {"kind": "payment", "amount": 100}
    resp = await ps.http.request(method, path, params={"token": ps.server.api_key},
                                 json=body if method == "POST" else None)
    assert resp.status_code == 401
    error = resp.json()["error"]
    assert error["code"] == "unauthorized" and "Authorization header" in error["message"]
    assert ps.server.api_key not in resp.text


async def test_the_api_key_is_refused_in_a_websocket_url(ps: Paystream) -> None:
    url = ps.server.base_url.replace("http", "ws") + f"/v1/ws?token={ps.server.api_key}"
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(url):
            pass
    assert info.value.response.status_code == 401
    async with websockets.connect(url.partition("?")[0], additional_headers=ps.backend):
        pass  # in the header it opens as before


async def test_tokens_live_at_most_the_maximum_ttl(ps: Paystream) -> None:
    """PAYSTREAM_MAX_TOKEN_TTL (3600 s by default) bounds every token: a longer ttl is a
    400, and a token minted elsewhere without exp, or expiring further ahead, is a 401."""
    import jwt

    pi = trigger.stripe_id("pi_")
    await ps.deliver(ps.event("payment_intent.processing", pi))
    too_long = await ps.http.post("/v1/stream-tokens", headers=ps.backend,
                                  json={"transaction_ids": [pi], "ttl_seconds": 3601})
    assert too_long.status_code == 400 and "PAYSTREAM_MAX_TOKEN_TTL" in too_long.json()["error"]["message"]
    secret = ps.server.token_secret
    forever = jwt.encode({"txn": [pi], "exp": int(time.time()) + 86400}, secret, algorithm="HS256")
    no_exp = jwt.encode({"txn": [pi]}, secret, algorithm="HS256")
    within = jwt.encode({"txn": [pi], "exp": int(time.time()) + 3600}, secret, algorithm="HS256")
    for token, status in ((forever, 401), (no_exp, 401), (within, 200)):
        resp = await ps.http.get(f"/v1/transactions/{pi}", headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == status, resp.text


async def test_sse_and_long_poll_end_when_their_token_expires(ps: Paystream) -> None:
    """A stream lives no longer than the token it was opened with: SSE ends cleanly at
    `exp` (a client reconnects with a fresh token and resumes from its seq), a long-poll
    answers then; the same token opens nothing after."""
    pi = trigger.stripe_id("pi_")
    await ps.deliver(ps.event("payment_intent.processing", pi))
    token = ps.token(pi, ttl=5)  # 4-5 s: time to open the stream on a busy machine
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    async with ps.sse(pi, token=token) as stream:
        assert (await stream.event()).event == "snapshot"
        assert await stream.rest(timeout=10) == []  # no event: the server ends it
    assert exp <= time.time() < exp + 5
    assert (await ps.http.get(f"/v1/transactions/{pi}/events", params={"token": token})).status_code == 401

    token = ps.token(pi, ttl=5)  # 4-5 s: time to open the stream on a busy machine
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    answer = await ps.http.get(f"/v1/transactions/{pi}", params={"await": "succeeded", "timeout": "30",
                                                                 "token": token}, timeout=40)
    assert answer.status_code == 200
    assert (answer.json()["status"], answer.json()["timed_out"]) == ("processing", True)
    assert exp <= time.time() + 0.05 < exp + 5
