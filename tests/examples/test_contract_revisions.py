"""examples/contract_revisions, the seed's rule as a Python effect, on the real server
(tests/conftest.py enables the examples): each $150 grants 2 revisions, once; a dispute
that takes the money takes them back, and a won one gives them back."""

from __future__ import annotations

import random
import time

import asyncpg
import pytest

from paystream.dev import trigger
from tests.support import Paystream

pytestmark = pytest.mark.e2e


async def revisions(db: asyncpg.Connection, contract: str) -> tuple[int, int, int]:
    row = await db.fetchrow("SELECT purchased, used, available FROM contract_revisions WHERE contract_id = $1",
                            contract)
    return (row["purchased"], row["used"], row["available"]) if row else (0, 0, 3)


async def test_a_purchase_grants_its_revisions_once_whatever_the_deliveries(
        ps: Paystream, db: asyncpg.Connection) -> None:
    contract, pi = trigger.stripe_id("ctr_"), trigger.stripe_id("pi_")
    meta, t = {"contractId": contract}, int(time.time()) - 60
    events = [ps.event("payment_intent.processing", pi, amount=30000, metadata=meta, created=t),
              ps.event("payment_intent.succeeded", pi, amount=30000, metadata=meta, created=t + 1),
              ps.event("charge.refunded", pi, amount=30000, amount_refunded=100, metadata=meta, created=t + 2)]
    deliveries = [e for e in events for _ in range(3)]
    random.shuffle(deliveries)
    for event in deliveries:
        await ps.deliver(event)
    assert await revisions(db, contract) == (4, 0, 7)  # $300: 2 × 2 revisions, 3 included
    last = (await ps.get(pi)).json()
    assert last["status"] == "partially_refunded"


async def test_a_pending_payment_grants_nothing(ps: Paystream, db: asyncpg.Connection) -> None:
    contract, pi = trigger.stripe_id("ctr_"), trigger.stripe_id("pi_")
    await ps.deliver(ps.event("payment_intent.processing", pi, amount=15000, metadata={"contractId": contract}))
    assert await revisions(db, contract) == (0, 0, 3)


@pytest.mark.parametrize("won", [False, True])
async def test_a_dispute_takes_the_grant_back_and_a_won_one_returns_it(
        ps: Paystream, db: asyncpg.Connection, won: bool) -> None:
    contract, pi, du = trigger.stripe_id("ctr_"), trigger.stripe_id("pi_"), trigger.stripe_id("du_")
    meta, t = {"contractId": contract}, int(time.time()) - 60
    await ps.deliver(ps.event("payment_intent.succeeded", pi, amount=15000, metadata=meta, created=t))
    # Weeks later: the dispute's events (they carry the dispute, not the payment's metadata),
    # repeated and in any order.
    events = [ps.event("charge.dispute.created", pi, amount=15000, dispute_id=du, created=t + 5)]
    if won:
        events.append(ps.event("charge.dispute.closed", pi, amount=15000, dispute_id=du, created=t + 9))
    deliveries = [e for e in events for _ in range(2)]
    random.shuffle(deliveries)
    for event in deliveries:
        await ps.deliver(event)
    assert await revisions(db, contract) == ((2, 0, 5) if won else (0, 0, 3))
    pushed = await db.fetchval(
        """SELECT data::json -> 'revisions' ->> 'available' FROM transaction_events e
             JOIN transactions t ON t.id = e.transaction_id WHERE t.stripe_id = $1 ORDER BY e.seq DESC LIMIT 1""", pi)
    assert int(pushed) == (5 if won else 3)  # the pushed event tells the page what is left
