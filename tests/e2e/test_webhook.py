"""POST /v1/stripe/webhook against the real server: verify, store once, answer precisely."""

from __future__ import annotations

import asyncio
import json
import time

import asyncpg
import pytest

from paystream.dev import trigger
from tests.support import Paystream, fixture_event

pytestmark = pytest.mark.e2e


async def fingerprint(db: asyncpg.Connection, pi: str) -> asyncpg.Record:
    """Everything a bad request about `pi` must leave untouched: its transaction, log and
    stored events.  (Scoped to `pi`: the suite's server may apply another test's late
    webhook meanwhile.)"""
    return await db.fetchrow(
        """SELECT (SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t.id), '')) FROM transactions t
                    WHERE t.stripe_id = $1) AS txns,
                  (SELECT md5(coalesce(string_agg(e::text, ',' ORDER BY e.transaction_id, e.seq), ''))
                     FROM transaction_events e JOIN transactions t ON t.id = e.transaction_id
                    WHERE t.stripe_id = $1) AS log,
                  (SELECT md5(coalesce(string_agg(s::text, ',' ORDER BY s.id), '')) FROM stripe_events s
                    WHERE s.object_id = $1) AS events""", pi)


def new_pi() -> str:
    return trigger.stripe_id("pi_")


async def test_a_verified_event_is_stored_applied_and_answered(ps: Paystream, db: asyncpg.Connection) -> None:
    pi = new_pi()
    event = ps.event("payment_intent.processing", pi, amount=15000)
    answer = await ps.deliver(event)
    assert answer == {"received": True, "id": event["id"], "outcome": "applied"}
    stored = await db.fetchrow("SELECT * FROM stripe_events WHERE id = $1", event["id"])
    assert stored["processed_at"] is not None and stored["outcome"] == "applied"
    assert json.loads(stored["raw_body"]) == event
    assert stored["headers"]["stripe-signature"].startswith("t=")
    txn = (await ps.get(pi)).json()
    assert (txn["status"], txn["amount"], txn["seq"], txn["stripe_id"]) == ("processing", 15000, 1, pi)
    assert txn["id"].startswith("txn_") and len(txn["id"]) == 30


async def test_a_repeat_delivery_answers_200_and_changes_nothing(ps: Paystream, db: asyncpg.Connection) -> None:
    pi = new_pi()
    event = ps.event("payment_intent.succeeded", pi)
    await ps.deliver(event)
    before = await fingerprint(db, pi)
    again = await ps.deliver(event)
    assert again["outcome"] == "duplicate"
    assert await fingerprint(db, pi) == before


async def test_twenty_concurrent_deliveries_of_one_event_apply_once(ps: Paystream, db: asyncpg.Connection) -> None:
    pi = new_pi()
    event = ps.event("payment_intent.succeeded", pi)
    answers = await asyncio.gather(*(ps.deliver(event) for _ in range(20)))
    outcomes = sorted(a["outcome"] for a in answers)
    assert outcomes == ["applied"] + ["duplicate"] * 19
    txn = (await ps.get(pi)).json()
    assert await db.fetchval("SELECT count(*) FROM transaction_events WHERE transaction_id = $1", txn["id"]) == 1
    assert await db.fetchval("SELECT count(*) FROM transactions WHERE stripe_id = $1", pi) == 1


async def test_concurrent_different_events_for_one_new_object_make_one_transaction(ps: Paystream, db: asyncpg.Connection) -> None:
    pi = new_pi()
    now = int(time.time())
    events = [ps.event(t, pi, created=now + i) for i, t in enumerate(
        ["payment_intent.created", "payment_intent.requires_action", "payment_intent.processing",
         "charge.succeeded", "payment_intent.succeeded"])]
    await asyncio.gather(*(ps.deliver(e) for e in events))
    assert await db.fetchval("SELECT count(*) FROM transactions WHERE stripe_id = $1", pi) == 1
    assert (await ps.get(pi)).json()["status"] == "succeeded"


async def test_a_second_secret_verifies_too(ps: Paystream) -> None:
    resp = await ps.send(ps.event("payment_intent.processing", new_pi()), secret=ps.server.rotated_secret)
    assert resp.status_code == 200, resp.text


def _signed(ps: Paystream, body: str) -> dict:
    return {"body": body, "signature": trigger.sign(body, ps.server.webhook_secret)}


BAD = {
    "missing signature": (lambda ps, body: {"body": body, "signature": ""}, "missing_signature"),
    "wrong secret": (lambda ps, body: {"body": body, "secret": "whsec_wrong"}, "invalid_signature"),
    "garbage signature": (lambda ps, body: {"body": body, "signature": "nonsense"}, "invalid_signature"),
    "tampered body": (lambda ps, body: {"body": body.replace("15000", "1"),
                                        "signature": trigger.sign(body, ps.server.webhook_secret)},
                      "invalid_signature"),
    "stale timestamp": (lambda ps, body: {"body": body, "timestamp": int(time.time()) - 3600},
                        "stale_signature"),
    "replayed signature": (lambda ps, body: {"body": body, "signature": trigger.sign(
        body, ps.server.webhook_secret, int(time.time()) - 301)}, "stale_signature"),
    "over 1 MiB": (lambda ps, body: _signed(ps, body[:-1] + ', "pad": "' + "x" * (1 << 20) + '"}'),
                   "payload_too_large"),
    "not JSON": (lambda ps, body: _signed(ps, "this is not json"), "malformed_body"),
    "JSON but no event": (lambda ps, body: _signed(ps, json.dumps({"hello": "world"})), "malformed_body"),
    "JSON but not an object": (lambda ps, body: _signed(ps, "9"), "malformed_body"),  # found by atheris
    "nested too deep": (lambda ps, body: _signed(ps, "[" * 100000 + "]" * 100000), "malformed_body"),
    "no object id": (lambda ps, body: _signed(ps, json.dumps(
        {"id": "evt_x1", "type": "payment_intent.succeeded", "created": 1, "data": {"object": {}}})),
        "malformed_body"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_bad_input_gets_its_400_and_changes_nothing(case: str, ps: Paystream, db: asyncpg.Connection) -> None:
    pi = new_pi()
    await ps.deliver(ps.event("payment_intent.processing", pi, amount=15000))  # a good event already stored
    before = await fingerprint(db, pi)
    body = trigger.encode(ps.event("payment_intent.succeeded", pi, amount=15000))
    make, code = BAD[case]
    resp = await ps.send(**make(ps, body))
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == code
    assert ps.server.webhook_secret not in resp.text
    assert await fingerprint(db, pi) == before
    assert (await ps.get(pi)).json()["status"] == "processing"


async def test_a_type_paystream_does_not_use_is_answered_200_and_kept_as_ignored(
        ps: Paystream, db: asyncpg.Connection) -> None:
    """A 400 would have Stripe retry it for three days and maybe disable the endpoint."""
    # A type the suite's emulator never sends, so no other test's late event is counted.
    price = trigger.stripe_id("price_")
    event = trigger.envelope("price.created", {"id": price, "object": "price", "currency": "usd",
                                               "unit_amount": 1500, "metadata": {}})
    metric = 'paystream_events_ignored_total{type="price.created"}'

    def counted(text: str) -> float:
        return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(metric)), 0.0)

    counted_before = counted((await ps.http.get("/metrics")).text)
    resp = await ps.send(event)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"received": True, "id": event["id"], "outcome": "ignored"}
    row = await db.fetchrow("SELECT processed_at, outcome FROM stripe_events WHERE id = $1", event["id"])
    assert row["processed_at"] is not None and row["outcome"] == "ignored"
    assert await db.fetchval("SELECT count(*) FROM transactions WHERE stripe_id = $1", price) == 0
    assert (await ps.deliver(event))["outcome"] == "duplicate"
    assert counted((await ps.http.get("/metrics")).text) == counted_before + 1


async def test_an_event_that_routes_nowhere_is_stored_and_answered_200(ps: Paystream, db: asyncpg.Connection) -> None:
    event = fixture_event("charge.failed__zulip")
    event["data"]["object"]["payment_intent"] = new_pi()
    assert (await ps.deliver(event))["outcome"] == "unrouted"
    assert await db.fetchval("SELECT outcome FROM stripe_events WHERE id = $1", event["id"]) == "unrouted"


async def test_real_fixture_bodies_drive_a_transaction(ps: Paystream) -> None:
    pi = new_pi()
    names = ["payment_intent.created", "payment_intent.requires_action", "payment_intent.succeeded"]
    for i, name in enumerate(names):
        event = fixture_event(f"{name}__stripe-ruby-mock", created=1648320000 + i)
        event["data"]["object"].update(id=pi, invoice=None)  # a plain payment, not an invoice's
        await ps.deliver(event)
    refund = fixture_event("charge.refunded__stripe-ruby-mock", created=1648320010)
    refund["data"]["object"]["payment_intent"] = pi
    await ps.deliver(refund)
    txn = (await ps.get(pi)).json()
    assert (txn["status"], txn["seq"], txn["amount"]) == ("refunded", 4, 2000)
