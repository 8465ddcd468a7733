"""A token names a transaction by either of its ids (issue 22, item 20).  The contract said a
token listing a transaction's Stripe id covers its `txn_` id, but an unlisted id was refused
before the transaction was read: a merchant who minted a token for `pi_…` got 403 reading
the same transaction as `txn_…` (and the other way round).  A token still learns nothing
about transactions it does not cover: 403 whether the id exists or not."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from paystream.dev import trigger
from tests.support import Paystream

pytestmark = pytest.mark.e2e


async def new_txn(ps: Paystream, customer: str | None = None) -> tuple[str, str]:
    """A transaction known from a webhook: (its txn_ id, its pi_ id)."""
    pi = trigger.stripe_id("pi_")
    await ps.deliver(ps.event("payment_intent.processing", pi, **({"customer": customer} if customer else {})))
    return (await ps.get(pi)).json()["id"], pi


@pytest.mark.parametrize("listed", ["stripe", "txn"])
async def test_a_token_for_one_id_reads_the_transaction_by_the_other(ps: Paystream, listed: str) -> None:
    txn_id, pi = await new_txn(ps)
    token = ps.token(pi if listed == "stripe" else txn_id)
    other = txn_id if listed == "stripe" else pi
    got = await ps.http.get(f"/v1/transactions/{other}", params={"token": token})
    assert got.status_code == 200, got.text
    assert (got.json()["id"], got.json()["stripe_id"]) == (txn_id, pi)
    polled = await ps.http.get(f"/v1/transactions/{other}", params={"token": token, "await": "processing",
                                                                     "timeout": "5"})
    assert polled.status_code == 200 and polled.json()["status"] == "processing", polled.text
    async with ps.sse(other, token=token) as stream:
        assert stream.response.status_code == 200
        assert (await stream.event()).json["id"] == txn_id
    url = ps.server.base_url.replace("http", "ws") + f"/v1/ws?token={token}"
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"op": "subscribe", "id": other}))
        snapshot = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert (snapshot["op"], snapshot["data"]["id"]) == ("snapshot", txn_id), snapshot
        await ps.deliver(ps.event("payment_intent.succeeded", pi))
        pushed = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert (pushed["op"], pushed["data"]["status"]) == ("status", "succeeded")


async def test_ids_a_token_does_not_cover_get_403_whether_they_exist_or_not(ps: Paystream) -> None:
    (mine_txn, mine_pi), (their_txn, their_pi) = await new_txn(ps), await new_txn(ps)
    missing_txn, missing_pi = "txn_" + trigger.stripe_id("pi_")[3:], trigger.stripe_id("pi_")
    for token in (ps.token(mine_pi), ps.token(mine_txn)):
        for any_id in (their_txn, their_pi, missing_txn, missing_pi):
            resp = await ps.http.get(f"/v1/transactions/{any_id}", params={"token": token})
            assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden", (any_id, resp.text)
    # A listed id that names no transaction is the token's own business: 404.
    resp = await ps.http.get(f"/v1/transactions/{missing_pi}", params={"token": ps.token(missing_pi)})
    assert resp.status_code == 404


async def test_a_customer_token_gets_403_for_a_missing_id_as_for_another_customers(ps: Paystream) -> None:
    """What docs/contract.md now says (it said 404): the same answer for an id that does not
    exist as for one that is not the customer's, so a customer token is no existence oracle."""
    _txn, theirs = await new_txn(ps, customer="cus_someone_else")
    token = ps.token(cus="cus_ids_test")
    for any_id in (theirs, trigger.stripe_id("pi_"), "txn_" + trigger.stripe_id("pi_")[3:]):
        resp = await ps.http.get(f"/v1/transactions/{any_id}", params={"token": token})
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden", (any_id, resp.text)
