"""The refresh limit is per caller first (issue 22, item 13): there was one bucket per
process, so one caller's burst of refreshes made another customer's refresh answer 429.
Now a token, and a client address, each have a share of PAYSTREAM_REFRESH_RATE; a caller
past its share is refused by its own bound, and what it did not spend is left for others."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from paystream.dev import trigger
from paystream.dev.localstripe import LocalStripe
from tests.conftest import Server
from tests.support import Paystream

pytestmark = pytest.mark.e2e


async def webhook_transactions(ps: Paystream, n: int) -> list[str]:
    """n transactions known from webhooks (localstripe has no such objects, so a refresh
    reaches Stripe and answers 502: it is counted all the same)."""
    pis = [trigger.stripe_id("pi_") for _ in range(n)]
    for pi in pis:
        await ps.deliver(ps.event("payment_intent.processing", pi))
    return pis


async def created_transaction(ps: Paystream) -> tuple[str, str]:
    """A transaction made through paystream (a real PaymentIntent at localstripe): its id
    and the stream token the merchant's backend hands the page."""
    resp = await ps.http.post("/v1/transactions", headers=ps.backend,
                              json={"kind": "payment", "amount": 900, "currency": "usd"})
    assert resp.status_code == 201, resp.text
    return resp.json()["transaction"]["id"], resp.json()["stream_token"]


async def refresh(ps: Paystream, any_id: str, token: str, client: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    if client is not None:
        headers["X-Forwarded-For"] = client
    return await ps.http.post(f"/v1/transactions/{any_id}/refresh", headers=headers)


async def test_one_token_past_its_share_leaves_another_customers_refresh_alone(ps: Paystream) -> None:
    mine = await webhook_transactions(ps, 40)  # twice the process-wide burst (20)
    token = ps.token(*mine)
    answers = []
    for pi in mine:  # one caller, one token, as fast as it can go
        answers.append(await refresh(ps, pi, token))
        if answers[-1].status_code == 429:
            break
    refused = answers[-1]
    assert refused.status_code == 429, [a.status_code for a in answers]
    assert "token" in refused.json()["error"]["message"], refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert all(a.status_code == 502 for a in answers[:-1])  # each reached (the emulated) Stripe
    assert len(answers) - 1 < 20, "refused by its own bound, before the process-wide one"
    txn_id, other_token = await created_transaction(ps)
    theirs = await refresh(ps, txn_id, other_token)
    assert theirs.status_code == 200, theirs.text
    assert theirs.json()["transaction"]["id"] == txn_id


@pytest.fixture
async def behind_proxy(database_url: str, local_stripe: LocalStripe) -> AsyncIterator[Paystream]:
    """A server behind a trusted proxy (this test): X-Forwarded-For names the client."""
    server = Server(database_url, {"STRIPE_API_BASE": local_stripe.url, "PAYSTREAM_TRUSTED_PROXIES": "127.0.0.1"})
    await asyncio.to_thread(server.start)
    try:
        async with Paystream(server) as client:
            yield client
    finally:
        server.stop()


async def test_one_address_past_its_share_leaves_another_addresses_refresh_alone(behind_proxy: Paystream) -> None:
    ps = behind_proxy
    mine = await webhook_transactions(ps, 30)
    # A token for each transaction: only the address is common to them all.
    answers = await asyncio.gather(*(refresh(ps, pi, ps.token(pi), "198.51.100.7") for pi in mine))
    refused = [a for a in answers if a.status_code == 429]
    assert refused, [a.status_code for a in answers]
    assert all("address" in a.json()["error"]["message"] for a in refused), [a.text for a in refused]
    assert all(a.status_code == 502 for a in answers if a.status_code != 429)
    txn_id, other_token = await created_transaction(ps)
    theirs = await refresh(ps, txn_id, other_token, "198.51.100.8")
    assert theirs.status_code == 200, theirs.text
