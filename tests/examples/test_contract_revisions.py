"""examples/contract_revisions, the Observatory's rule as a Python effect, on the real
server (tests/conftest.py enables the examples): exactly 15,000 USD grants 2 revisions,
once; any other payment grants none and is flagged; a refund or a dispute that withdrew
the funds takes the grant back (won, it returns), a shortfall of used revisions is
flagged; use_revision() spends one and refuses below zero."""

from __future__ import annotations

import asyncio
import json
import random
import time

import asyncpg
import pytest

from paystream.dev import trigger
from tests.support import Paystream, wait_until

pytestmark = pytest.mark.e2e

PRICE = 15000


async def revisions(db: asyncpg.Connection, contract: str) -> tuple[int, int, int]:
    """(purchased, used, available), read as the product reads them: available for any contract."""
    row = await db.fetchrow("SELECT purchased, used, available FROM contract_revisions WHERE contract_id = $1",
                            contract)
    available = await db.fetchval("SELECT contract_available($1)", contract)
    assert row is None or row["available"] == available == 3 + row["purchased"] - row["used"]
    return (row["purchased"], row["used"], available) if row else (0, 0, available)


async def pushed(db: asyncpg.Connection, pi: str) -> dict:
    """The `revisions` field of the transaction's last pushed event."""
    data = await db.fetchval(
        """SELECT data::text FROM transaction_events e JOIN transactions t ON t.id = e.transaction_id
            WHERE t.stripe_id = $1 ORDER BY e.seq DESC LIMIT 1""", pi)
    return json.loads(data)["revisions"]


async def deliver_shuffled(ps: Paystream, events: list[dict], times: int = 3) -> None:
    deliveries = [e for e in events for _ in range(times)]
    seed = random.randrange(1 << 30)
    print(f"delivery order seed: {seed}")
    random.Random(seed).shuffle(deliveries)
    for event in deliveries:
        await ps.deliver(event)


async def buy(ps: Paystream, contract: str, t: int, **kw: object) -> str:
    pi = trigger.stripe_id("pi_")
    await ps.deliver(ps.event("payment_intent.succeeded", pi, metadata={"contractId": contract}, created=t,
                              **{"amount": PRICE, **kw}))
    return pi


async def test_a_purchase_of_exactly_150_usd_grants_2_once_whatever_the_deliveries(
        ps: Paystream, db: asyncpg.Connection) -> None:
    contract, pi = trigger.stripe_id("ctr_"), trigger.stripe_id("pi_")
    meta, t = {"contractId": contract}, int(time.time()) - 60
    await deliver_shuffled(ps, [ps.event("payment_intent.processing", pi, amount=PRICE, metadata=meta, created=t),
                                ps.event("payment_intent.succeeded", pi, amount=PRICE, metadata=meta, created=t + 1)])
    assert await revisions(db, contract) == (2, 0, 5)
    assert await pushed(db, pi) == {"contract_id": contract, "available": 5, "shortfall": 0}
    assert await db.fetchval("SELECT count(*) FROM contract_flags WHERE contract_id = $1", contract) == 0


@pytest.mark.parametrize(("amount", "currency"), [(30000, "usd"), (14999, "usd"), (15001, "usd"), (PRICE, "eur")])
async def test_any_other_amount_or_currency_grants_nothing_and_is_flagged(
        ps: Paystream, db: asyncpg.Connection, amount: int, currency: str) -> None:
    contract = trigger.stripe_id("ctr_")
    pi = await buy(ps, contract, int(time.time()) - 60, amount=amount, currency=currency)
    assert await revisions(db, contract) == (0, 0, 3)
    flags = await db.fetch("SELECT reason, detail::text FROM contract_flags WHERE contract_id = $1", contract)
    assert [(f["reason"], json.loads(f["detail"])) for f in flags] == [
        ("wrong_price", {"amount": amount, "currency": currency, "expected": {"amount": PRICE, "currency": "usd"}})]
    assert (await pushed(db, pi))["flag"] == "wrong_price"


async def test_a_pending_payment_grants_nothing(ps: Paystream, db: asyncpg.Connection) -> None:
    contract, pi = trigger.stripe_id("ctr_"), trigger.stripe_id("pi_")
    await ps.deliver(ps.event("payment_intent.processing", pi, amount=PRICE, metadata={"contractId": contract}))
    assert await revisions(db, contract) == (0, 0, 3)


@pytest.mark.parametrize("refunded", [100, PRICE])
async def test_a_refund_takes_the_grant_back_once(ps: Paystream, db: asyncpg.Connection, refunded: int) -> None:
    contract, t = trigger.stripe_id("ctr_"), int(time.time()) - 60
    pi = await buy(ps, contract, t)
    await deliver_shuffled(ps, [ps.event("charge.refunded", pi, amount=PRICE, amount_refunded=refunded, created=t + 2),
                                ps.event("charge.refunded", pi, amount=PRICE, amount_refunded=PRICE, created=t + 3)])
    assert await revisions(db, contract) == (0, 0, 3)
    assert await db.fetchval("SELECT count(*) FROM contract_flags WHERE contract_id = $1", contract) == 0


@pytest.mark.parametrize(("closed", "expected"), [(None, (0, 0, 3)), ("won", (2, 0, 5)), ("lost", (0, 0, 3))])
async def test_a_dispute_takes_the_grant_back_and_only_a_won_one_returns_it(
        ps: Paystream, db: asyncpg.Connection, closed: str | None, expected: tuple[int, int, int]) -> None:
    contract, du, t = trigger.stripe_id("ctr_"), trigger.stripe_id("du_"), int(time.time()) - 60
    pi = await buy(ps, contract, t)
    # Weeks later: the dispute's events (they carry the dispute, not the payment's metadata),
    # repeated and in any order.
    events = [ps.event("charge.dispute.created", pi, amount=PRICE, dispute_id=du, created=t + 5)]
    if closed:
        events.append(ps.event("charge.dispute.closed", pi, amount=PRICE, dispute_id=du, dispute_status=closed,
                               created=t + 9))
    await deliver_shuffled(ps, events, times=2)
    assert await revisions(db, contract) == expected
    assert (await pushed(db, pi))["available"] == expected[2]  # the pushed event tells the page what is left


async def test_a_take_back_of_used_revisions_is_flagged_as_a_shortfall(ps: Paystream, db: asyncpg.Connection) -> None:
    contract, t = trigger.stripe_id("ctr_"), int(time.time()) - 60
    pi = await buy(ps, contract, t)
    assert [await db.fetchval("SELECT use_revision($1)", contract) for _ in range(4)] == [4, 3, 2, 1]
    await ps.deliver(ps.event("charge.dispute.closed", pi, amount=PRICE, dispute_status="lost", created=t + 9))
    assert await revisions(db, contract) == (0, 4, -1)  # 3 + 0 − 4: one used that is no longer paid for
    assert (await pushed(db, pi))["shortfall"] == 1
    flags = await db.fetch("SELECT reason, detail::text FROM contract_flags WHERE contract_id = $1", contract)
    assert [(f["reason"], json.loads(f["detail"])) for f in flags] == [
        ("shortfall", {"taken_back": 2, "used": 4, "shortfall": 1})]
    with pytest.raises(asyncpg.CheckViolationError, match="no revision available"):
        await db.fetchval("SELECT use_revision($1)", contract)
    assert await revisions(db, contract) == (0, 4, -1)


async def test_a_contract_no_one_paid_for_has_3_and_spends_them_down_to_zero(db: asyncpg.Connection) -> None:
    contract = trigger.stripe_id("ctr_")
    assert await revisions(db, contract) == (0, 0, 3)
    assert [await db.fetchval("SELECT use_revision($1)", contract) for _ in range(3)] == [2, 1, 0]
    with pytest.raises(asyncpg.CheckViolationError):
        await db.fetchval("SELECT use_revision($1)", contract)
    assert await revisions(db, contract) == (0, 3, 0)


async def test_the_last_revision_goes_to_one_of_two_at_once(database_url: str) -> None:
    contract = trigger.stripe_id("ctr_")
    conns = [await asyncpg.connect(database_url) for _ in range(2)]
    try:
        await conns[0].execute("SELECT use_revision($1)", contract)
        await conns[0].execute("SELECT use_revision($1)", contract)
        first, second = (c.transaction() for c in conns)
        await first.start()
        await second.start()
        assert await conns[0].fetchval("SELECT use_revision($1)", contract) == 0
        racing = asyncio.ensure_future(conns[1].fetchval("SELECT use_revision($1)", contract))
        await wait_until(lambda: conns[0].fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", conns[1].get_server_pid()),
            what="the second use_revision to wait for the first")
        await first.commit()  # the second waited on the contract's row; it now sees none left
        with pytest.raises(asyncpg.CheckViolationError):
            await racing
        await second.rollback()
        assert await conns[0].fetchval("SELECT contract_available($1)", contract) == 0
    finally:
        for c in conns:
            await c.close()
