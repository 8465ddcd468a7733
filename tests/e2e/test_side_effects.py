"""Metadata routing and side effects: duplicated, reordered and concurrent deliveries
never credit twice."""

from __future__ import annotations

import asyncio
import random
import time

import asyncpg
import pytest

from paystream.dev import trigger
from tests.support import Paystream

pytestmark = pytest.mark.e2e


def story(ps: Paystream, pi: str, t: int, *, amount: int, refunds: tuple[int, ...] = (), **kw: object) -> list[dict]:
    events = [ps.event("payment_intent.created", pi, amount=amount, created=t, **kw),
              ps.event("charge.succeeded", pi, amount=amount, created=t + 1, **kw),
              ps.event("payment_intent.succeeded", pi, amount=amount, created=t + 1, **kw)]
    for i, total in enumerate(refunds):
        events.append(ps.event("charge.refunded", pi, amount=amount, amount_refunded=total, created=t + 2 + i, **kw))
    return events


async def test_a_shuffled_storm_of_repeats_credits_exactly_once(ps: Paystream, db: asyncpg.Connection) -> None:
    t = int(time.time()) - 600
    contract, customer = trigger.stripe_id("ctr_"), trigger.stripe_id("cus_")
    pis = {name: trigger.stripe_id("pi_") for name in ("c1", "c2", "ad", "w1", "w2", "w3", "odd")}
    wallet = {"customer": customer, "metadata": {"paystream_kind": "wallet_top_up"}}
    events = (
        story(ps, pis["c1"], t, amount=15000, metadata={"contractId": contract})
        + story(ps, pis["c2"], t, amount=15000, metadata={"contractId": contract})
        + story(ps, pis["ad"], t, amount=9900,
                metadata={"advertiserId": "adv_1", "sizeId": "half_page", "publicationId": "pub_7"})
        + story(ps, pis["w1"], t, amount=1000, refunds=(400, 1000), **wallet)
        + story(ps, pis["w2"], t, amount=1000, **wallet)
        + story(ps, pis["w3"], t, amount=1000, refunds=(250,), **wallet)
        + story(ps, pis["odd"], t, amount=500, metadata={"campaign": "spring"})
    )
    deliveries = [e for e in events for _ in range(5)]
    seed = random.randrange(1 << 30)
    print(f"delivery order seed: {seed}")  # shown on failure, to replay the order
    random.Random(seed).shuffle(deliveries)
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for e in deliveries:
        queue.put_nowait(e)

    async def sender() -> list[str]:
        outcomes = []
        while not queue.empty():
            outcomes.append((await ps.deliver(queue.get_nowait()))["outcome"])
        return outcomes

    outcomes = [o for chunk in await asyncio.gather(*(sender() for _ in range(8))) for o in chunk]
    assert len(outcomes) == len(deliveries)
    assert outcomes.count("duplicate") == len(deliveries) - len(events)

    revisions = await db.fetchrow("SELECT * FROM contract_revisions WHERE contract_id = $1", contract)
    assert (revisions["purchased"], revisions["used"], revisions["available"]) == (4, 0, 7)
    assert await db.fetchval("SELECT count(*) FROM ad_sales WHERE payment_intent_id = $1", pis["ad"]) == 1
    assert await db.fetchval("SELECT coalesce(sum(amount), 0) FROM ledger_entries WHERE account = $1",
                             f"wallet:{customer}") == 0 + 1000 + 750
    groups = await db.fetch(
        """SELECT entry_group, sum(amount) AS total, count(*) AS n FROM ledger_entries
            WHERE transaction_id IN (SELECT id FROM transactions WHERE customer_id = $1)
            GROUP BY 1""", customer)
    assert all(g["total"] == 0 and g["n"] == 2 for g in groups)
    assert sum(g["entry_group"].startswith("topup:") for g in groups) == 3
    # Refunds reverse exactly what was refunded (one group per running total that arrived
    # in order, so their number depends on the order, their sum does not).
    reversed_by_txn = await db.fetch(
        """SELECT t.stripe_id, t.amount_refunded, -coalesce(sum(l.amount), 0) AS reversed
             FROM transactions t LEFT JOIN ledger_entries l
               ON l.transaction_id = t.id AND l.entry_group LIKE 'refund:%' AND l.account LIKE 'wallet:%'
            WHERE t.customer_id = $1 GROUP BY 1, 2""", customer)
    assert {r["stripe_id"]: (r["amount_refunded"], r["reversed"]) for r in reversed_by_txn} == {
        pis["w1"]: (1000, 1000), pis["w2"]: (0, 0), pis["w3"]: (250, 250)}
    statuses = {name: (await ps.get(pi)).json()["status"] for name, pi in pis.items()}
    assert statuses == {"c1": "succeeded", "c2": "succeeded", "ad": "succeeded", "w1": "refunded",
                        "w2": "succeeded", "w3": "partially_refunded", "odd": "succeeded"}
    # Metadata no effect understands changes nothing but the status.
    assert await db.fetchval(
        """SELECT (SELECT count(*) FROM contract_purchases WHERE payment_intent_id = $1)
                + (SELECT count(*) FROM ad_sales WHERE payment_intent_id = $1)""", pis["odd"]) == 0
    assert await db.fetchval(
        "SELECT count(*) FROM stripe_events WHERE id = ANY($1) AND processed_at IS NOT NULL",
        [e["id"] for e in events]) == len(events)
    last = await db.fetchval(
        """SELECT data::json->'balance'->>'amount' FROM transaction_events e JOIN transactions t ON t.id = e.transaction_id
            WHERE t.stripe_id = $1 ORDER BY e.seq DESC LIMIT 1""", pis["w2"])
    assert last is not None  # wallet events carry the customer's balance


async def test_the_ledger_refuses_an_unbalanced_entry(db: asyncpg.Connection, ps: Paystream) -> None:
    pi = trigger.stripe_id("pi_")
    await ps.deliver(ps.event("payment_intent.succeeded", pi))
    txn_id = (await ps.get(pi)).json()["id"]
    with pytest.raises(asyncpg.CheckViolationError, match="does not balance"):
        async with db.transaction():
            await db.execute("INSERT INTO ledger_entries (entry_group, transaction_id, account, amount, currency)"
                             " VALUES ('oops', $1, 'wallet:cus_x', 100, 'usd')", txn_id)
