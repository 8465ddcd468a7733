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


async def test_after_answers_on_any_change_logged_after_that_seq(ps: Paystream) -> None:
    """A change that keeps the status (here a second decline, with its own error) answers
    `after`; `await` alone would have waited for another status."""
    pi, base = trigger.stripe_id("pi_"), int(time.time()) - 60
    await ps.deliver(ps.event("payment_intent.processing", pi, created=base))
    await ps.deliver(ps.event("payment_intent.payment_failed", pi, created=base + 1))
    first = (await ps.get(pi)).json()
    assert (first["status"], first["seq"], first["last_error"]["code"]) == ("requires_payment_method", 2,
                                                                             "card_declined")
    assert (await ps.get(pi, after="1", timeout="20")).json()["seq"] == 2  # already past it: at once
    waiting = asyncio.create_task(ps.get(pi, after="2", timeout="20"))
    await _until_waiting(ps)
    again = ps.event("payment_intent.payment_failed", pi, created=base + 2)
    again["data"]["object"]["last_payment_error"].update(code="expired_card", message="Your card has expired.")
    await ps.deliver(again)
    body = (await asyncio.wait_for(waiting, 10)).json()
    assert (body["status"], body["seq"], body["last_error"]["code"], body["timed_out"]) == (
        "requires_payment_method", 3, "expired_card", False)
    quiet = (await ps.get(pi, after="3", timeout="0.2")).json()
    assert (quiet["seq"], quiet["timed_out"]) == (3, True)
    for bad in ("-1", "x", "1000000000"):
        resp = await ps.get(pi, after=bad)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "bad_request"
