"""GET /v1/transactions/{id}?await=…: answers when the status arrives, or at the timeout."""

from __future__ import annotations

import asyncio
import time

import pytest

from paystream.dev import trigger
from tests.support import Paystream

pytestmark = pytest.mark.e2e


async def new_txn(ps: Paystream) -> str:
    pi = trigger.stripe_id("pi_")
    await ps.deliver(ps.event("payment_intent.processing", pi, created=int(time.time()) - 60))
    return pi


async def test_answers_as_soon_as_the_status_arrives(ps: Paystream) -> None:
    pi = await new_txn(ps)
    waiting = asyncio.create_task(ps.get(pi, **{"await": "succeeded,canceled", "timeout": "20"}))
    # The waiter is registered once its subscription exists; the webhook is sent after
    # the server has counted it in the connections gauge.
    await _until_waiting(ps)
    await ps.deliver(ps.event("payment_intent.succeeded", pi))
    body = (await asyncio.wait_for(waiting, 10)).json()
    assert (body["status"], body["seq"], body["timed_out"]) == ("succeeded", 2, False)
    assert "previous_status" not in body


async def test_already_there_answers_at_once(ps: Paystream) -> None:
    pi = await new_txn(ps)
    body = (await ps.get(pi, **{"await": "processing", "timeout": "20"})).json()
    assert (body["status"], body["timed_out"]) == ("processing", False)


async def test_times_out_with_the_current_state(ps: Paystream) -> None:
    pi = await new_txn(ps)
    body = (await ps.get(pi, **{"await": "succeeded", "timeout": "0.2"})).json()
    assert (body["status"], body["timed_out"]) == ("processing", True)


async def test_a_token_can_long_poll_and_bad_params_are_400(ps: Paystream) -> None:
    pi = await new_txn(ps)
    resp = await ps.http.get(f"/v1/transactions/{pi}", params={"await": "processing", "token": ps.token(pi)})
    assert resp.status_code == 200
    for params in ({"await": "paid"}, {"await": "succeeded", "timeout": "9999"}, {"await": "succeeded", "timeout": "x"}):
        resp = await ps.get(pi, **params)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "bad_request"
    resp = await ps.http.get(f"/v1/transactions/{pi}")
    assert resp.status_code == 401


async def _until_waiting(ps: Paystream) -> None:
    from tests.support import wait_until

    async def waiting() -> bool:
        metrics = (await ps.http.get("/metrics")).text
        return any(line.startswith('paystream_connections{transport="long_poll"} ') and
                   float(line.split()[-1]) >= 1 for line in metrics.splitlines())

    await wait_until(waiting, what="the long-poll to be registered")
