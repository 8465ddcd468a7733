"""POST /v1/stream-tokens: the backend mints a token the browser streams with."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

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

