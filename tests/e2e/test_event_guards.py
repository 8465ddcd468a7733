"""Signed events that are odd, hostile or orphaned (issue 22, items 3, 5, 8, 9): answered
200 with a precise outcome, never a 500; what is stored always agrees with what was
applied; nothing is parked forever."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import asyncpg
import pytest

from paystream import db as paystream_db
from paystream.changes.store import new_transaction_id
from paystream.dev import trigger
from paystream.dev.localstripe import LocalStripe
from tests.conftest import Server
from tests.support import Paystream, wait_until

pytestmark = pytest.mark.e2e


async def test_a_redelivered_id_is_stored_with_the_body_that_is_applied(
        ps: Paystream, db: asyncpg.Connection) -> None:
    """An evt_ first kept unapplied (here: an impossible amount, outcome invalid), then sent
    again with another validly signed body, is applied from the second body, and the
    second body is the one stored."""
    pi = trigger.stripe_id("pi_")
    first = ps.event("payment_intent.processing", pi)
    first["data"]["object"]["amount"] = -5
    assert (await ps.deliver(first))["outcome"] == "invalid"
    second = ps.event("payment_intent.succeeded", pi, amount=2500)
    second["id"] = first["id"]
    assert (await ps.deliver(second))["outcome"] == "applied"
    stored = await db.fetchrow("SELECT type, raw_body, outcome, processed_at FROM stripe_events WHERE id = $1",
                               first["id"])
    assert stored["type"] == "payment_intent.succeeded" and stored["outcome"] == "applied"
    assert json.loads(stored["raw_body"]) == second
    assert (await ps.get(pi)).json()["amount"] == 2500
    # Once applied, a third body changes nothing, stored or applied.
    third = ps.event("payment_intent.canceled", pi)
    third["id"] = first["id"]
    assert (await ps.deliver(third))["outcome"] == "duplicate"
    assert json.loads(await db.fetchval("SELECT raw_body FROM stripe_events WHERE id = $1", first["id"])) == second


@pytest.mark.parametrize("reason", ["card\x00expired", "lost\ud800card"])
async def test_a_refund_failure_reason_stripe_never_sends_is_invalid_not_500(
        ps: Paystream, db: asyncpg.Connection, reason: str) -> None:
    pi = trigger.stripe_id("pi_")
    await ps.deliver(ps.event("payment_intent.succeeded", pi))
    refund = {"id": trigger.stripe_id("re_"), "object": "refund", "amount": 500, "currency": "usd",
              "payment_intent": pi, "status": "failed", "failure_reason": reason}
    event = trigger.envelope("refund.failed", refund)
    body = json.dumps(event)  # json escapes the NUL and the lone surrogate, as Stripe's encoder would
    resp = await ps.send(body=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["outcome"] == "invalid"
    assert (await ps.get(pi)).json()["last_error"] is None
    error = await db.fetchval("SELECT error FROM stripe_events WHERE id = $1", event["id"])
    assert "NUL or a lone surrogate" in error


def nested(depth: int) -> str:
    """JSON text of an object `depth` levels deep (written out: json.dumps recurses)."""
    return '{"n":' * depth + '{"leaf":"x"}' + "}" * depth


@pytest.mark.parametrize(("depth", "outcome"), [(20, "applied"), (40, "invalid"), (900, "invalid")])
async def test_metadata_nesting_is_bounded_below_what_responses_can_write(
        ps: Paystream, depth: int, outcome: str) -> None:
    pi = trigger.stripe_id("pi_")
    event = ps.event("payment_intent.processing", pi)
    event["data"]["object"]["metadata"] = {"deep": "DEEP"}
    resp = await ps.send(body=json.dumps(event).replace('"DEEP"', nested(depth)))
    assert resp.status_code == 200, resp.text
    assert resp.json()["outcome"] == outcome
    got = await ps.get(pi)
    assert got.status_code == (200 if outcome == "applied" else 404), got.text
    long_poll = await ps.http.get(f"/v1/transactions/{pi}", params={"token": ps.token(pi), "await": "succeeded",
                                                                     "timeout": "0"})
    assert long_poll.status_code in (200, 404), long_poll.text


async def test_an_event_parked_for_a_transaction_never_written_expires(
        own_database: str, fresh_stripe: LocalStripe) -> None:
    await paystream_db.migrate(own_database)
    server = Server(own_database, {"STRIPE_API_BASE": fresh_stripe.url, "PAYSTREAM_PARKED_EXPIRY": "1",
                                   "PAYSTREAM_RECOVERY_INTERVAL": "0.2"})
    await asyncio.to_thread(server.start)
    db = await asyncpg.connect(own_database)
    try:
        async with Paystream(server) as ps:
            pi, never = trigger.stripe_id("pi_"), new_transaction_id()
            event = ps.event("payment_intent.processing", pi, metadata={"transaction_id": never})
            assert (await ps.deliver(event))["outcome"] == "parked"

            async def expired() -> bool:
                return await db.fetchval("SELECT outcome FROM stripe_events WHERE id = $1", event["id"]) == "expired"

            await wait_until(expired, timeout=30, what="the parked event to expire")
            assert await db.fetchval("SELECT count(*) FROM parked_events WHERE stripe_event_id = $1", event["id"]) == 0
            assert (await ps.deliver(event))["outcome"] == "duplicate"  # ended: a redelivery changes nothing
            metrics = (await ps.http.get("/metrics")).text
            assert "paystream_parked_events_expired_total 1.0" in metrics
            listed = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "paystream", "events", "expired"], env=server.env,
                capture_output=True, text=True, timeout=60)
            assert listed.returncode == 0, listed.stderr
            rows = [json.loads(line) for line in listed.stdout.splitlines()]
            assert [(r["id"], r["outcome"]) for r in rows] == [(event["id"], "expired")]
            assert never in rows[0]["error"]
    finally:
        await db.close()
        server.stop()
