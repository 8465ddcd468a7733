"""Concurrent POST /v1/transactions with one Idempotency-Key (issue 22, item 4): exactly
one request calls Stripe, the others wait for its answer and give the same one, or answer
409 idempotency_key_in_flight with Retry-After when they waited past the bound.

localstripe does not honour Stripe's own Idempotency-Key (every create makes a new
PaymentIntent), so the PaymentIntents counted at the emulator show every call that reached
it, not what real Stripe would have folded into one."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from paystream.dev.localstripe import LocalStripe
from paystream.payments.create import IDEMPOTENCY_WAIT
from tests.support import Paystream, StripeJs

pytestmark = pytest.mark.e2e

CONCURRENT = 8
ROUNDS = 4


@pytest.fixture
async def stripe_js(local_stripe: LocalStripe) -> AsyncIterator[StripeJs]:
    async with StripeJs(local_stripe.url) as js:
        yield js


async def payment_intents_tagged(stripe_js: StripeJs, tag: str) -> list[dict]:
    """Every PaymentIntent at the emulator whose metadata carries this tag, page by page."""
    found, after = [], None
    while True:
        params = {"limit": 100} | ({"starting_after": after} if after else {})
        page = await stripe_js.http.get("/v1/payment_intents", params=params)
        assert page.status_code == 200, page.text
        data = page.json()["data"]
        found += [pi for pi in data if (pi.get("metadata") or {}).get("tag") == tag]
        if not page.json()["has_more"] or not data:
            return found
        after = data[-1]["id"]


def body_for(tag: str) -> bytes:
    return json.dumps({"kind": "payment", "amount": 4321, "currency": "usd", "metadata": {"tag": tag}}).encode()


async def post(ps: Paystream, raw: bytes, key: str) -> httpx.Response:
    return await ps.http.post("/v1/transactions", content=raw, timeout=IDEMPOTENCY_WAIT + 30,
                              headers={**ps.backend, "Idempotency-Key": key, "Content-Type": "application/json"})


def assert_in_flight(resp: httpx.Response) -> None:
    assert resp.status_code == 409, resp.text
    assert resp.json()["error"]["code"] == "idempotency_key_in_flight"
    assert int(resp.headers["retry-after"]) >= 1


async def test_concurrent_requests_with_one_key_make_one_payment_intent(
        ps: Paystream, stripe_js: StripeJs, db: asyncpg.Connection) -> None:
    for _ in range(ROUNDS):
        tag, key = secrets.token_hex(8), "race-" + secrets.token_hex(8)
        raw = body_for(tag)
        answers = await asyncio.gather(*(post(ps, raw, key) for _ in range(CONCURRENT)))

        created = [a for a in answers if a.status_code == 201]
        for other in (a for a in answers if a.status_code != 201):
            assert_in_flight(other)  # only a request that waited past the bound
        assert created, [a.text for a in answers]
        first = created[0].json()
        assert all(a.json() == first for a in created), "every 201 is the one answer"
        # A request turned away while the key was in flight gets that answer on its retry.
        again = await post(ps, raw, key)
        assert again.status_code == 201 and again.json() == first

        txn = first["transaction"]
        assert await db.fetchval("SELECT count(*) FROM transactions WHERE metadata->>'tag' = $1", tag) == 1
        pis = await payment_intents_tagged(stripe_js, tag)
        assert [pi["id"] for pi in pis] == [txn["stripe_id"]], f"{len(pis)} PaymentIntents for one key"
        assert pis[0]["metadata"]["transaction_id"] == txn["id"]
        assert first["client_secret"] == pis[0]["client_secret"]


async def test_a_key_claimed_elsewhere_waits_then_answers_409_and_lapses_if_its_holder_died(
        ps: Paystream, stripe_js: StripeJs, db: asyncpg.Connection) -> None:
    tag, key = secrets.token_hex(8), "held-" + secrets.token_hex(8)
    raw = body_for(tag)
    # Another node claimed the key and is still calling Stripe (its claim is renewed).
    await db.execute(
        """INSERT INTO idempotency_keys (key, request_hash, claim, claimed_until)
           VALUES ($1, $2, 'another-node', clock_timestamp() + interval '1 hour')""",
        key, hashlib.sha256(raw).hexdigest())

    other_body = await post(ps, body_for(tag + "-other"), key)
    assert other_body.status_code == 400, other_body.text
    assert other_body.json()["error"]["code"] == "idempotency_key_reused"

    waited = await post(ps, raw, key)
    assert_in_flight(waited)
    assert await db.fetchval("SELECT count(*) FROM transactions WHERE metadata->>'tag' = $1", tag) == 0
    assert await payment_intents_tagged(stripe_js, tag) == []

    # The holder died: its claim is no longer renewed and lapses; a retry takes the key over.
    await db.execute("UPDATE idempotency_keys SET claimed_until = clock_timestamp() - interval '1 second'"
                     " WHERE key = $1", key)
    answers = await asyncio.gather(*(post(ps, raw, key) for _ in range(CONCURRENT)))
    assert {a.status_code for a in answers} <= {201, 409}, [a.text for a in answers]
    created = [a.json() for a in answers if a.status_code == 201]
    assert created and all(c == created[0] for c in created)
    pis = await payment_intents_tagged(stripe_js, tag)
    assert [pi["id"] for pi in pis] == [created[0]["transaction"]["stripe_id"]]
    assert await db.fetchval("SELECT claim IS NULL AND claimed_until IS NULL FROM idempotency_keys"
                             " WHERE key = $1", key)


async def test_a_5xx_is_the_answer_of_every_request_that_waited_and_a_retry_calls_stripe_again(
        database_url: str, db: asyncpg.Connection) -> None:
    from tests.conftest import Server
    from tests.harness import free_port

    server = await asyncio.to_thread(
        Server(database_url, {"STRIPE_API_BASE": f"http://127.0.0.1:{free_port()}"}).start)

    def create_calls() -> int:  # each failed create at Stripe logs this line once
        return server.log_path.read_text(errors="replace").count("trying to create a PaymentIntent")

    try:
        async with Paystream(server) as ps:
            tag, key = secrets.token_hex(8), "down-" + secrets.token_hex(8)
            raw = body_for(tag)
            before = create_calls()
            answers = await asyncio.gather(*(post(ps, raw, key) for _ in range(CONCURRENT)))
            failed = [a for a in answers if a.status_code == 502]
            for other in (a for a in answers if a.status_code != 502):
                assert_in_flight(other)
            assert failed, [a.text for a in answers]
            assert all(a.json() == failed[0].json() for a in failed)
            assert failed[0].json()["error"]["code"] == "stripe_unavailable"
            assert create_calls() - before == 1
            assert await db.fetchval("SELECT count(*) FROM transactions WHERE metadata->>'tag' = $1", tag) == 1

            # A 5xx is not final: the next request with the key calls Stripe again, for the
            # same transaction (so with the same Stripe idempotency key).
            retry = await post(ps, raw, key)
            assert retry.status_code == 502 and retry.json() == failed[0].json()
            assert create_calls() - before == 2
    finally:
        server.stop()
