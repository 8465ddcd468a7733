"""Any delivery order of a payment's events ends in the same status, with a clean log."""

from __future__ import annotations

import asyncio
import itertools
import time

import asyncpg
import pytest

from paystream.changes.lifecycle import RANK
from paystream.dev import trigger
from tests.support import Paystream

pytestmark = pytest.mark.e2e

SEQUENCES = {
    "3-D Secure, then success": (
        ["payment_intent.created", "payment_intent.requires_action", "payment_intent.processing",
         "payment_intent.succeeded"], "succeeded"),
    "declined, retried, succeeded": (
        ["payment_intent.created", "payment_intent.requires_action", "payment_intent.payment_failed",
         "payment_intent.succeeded"], "succeeded"),
    "authentication failed": (
        ["payment_intent.created", "payment_intent.processing", "payment_intent.requires_action",
         "payment_intent.payment_failed"], "requires_payment_method"),
    "authorised, captured, refunded": (
        ["payment_intent.created", "payment_intent.amount_capturable_updated",
         "payment_intent.succeeded", "charge.refunded"], "refunded"),
}


async def run_permutation(ps: Paystream, db: asyncpg.Connection, types: list[str], order: tuple[int, ...]) -> tuple[str, list]:
    pi = trigger.stripe_id("pi_")
    base = int(time.time()) - 100
    events = [ps.event(t, pi, created=base + i) for i, t in enumerate(types)]
    for i in order:
        await ps.deliver(events[i])
        await ps.deliver(events[i])  # and every one delivered twice
    txn = (await ps.get(pi)).json()
    log = await db.fetch("SELECT seq, status, data::text FROM transaction_events WHERE transaction_id = $1"
                         " ORDER BY seq", txn["id"])
    return txn, log


@pytest.mark.parametrize("name", list(SEQUENCES))
async def test_every_permutation_ends_in_the_same_status(name: str, ps: Paystream, database_url: str) -> None:
    types, expected = SEQUENCES[name]
    conns = [await asyncpg.connect(database_url) for _ in range(4)]
    try:
        perms = list(itertools.permutations(range(len(types))))

        async def worker(k: int) -> list:
            return [await run_permutation(ps, conns[k], types, p) for p in perms[k::4]]

        results = [r for chunk in await asyncio.gather(*(worker(k) for k in range(4))) for r in chunk]
    finally:
        for c in conns:
            await c.close()
    assert len(results) == 24
    for txn, log in results:
        assert txn["status"] == expected
        assert [r["seq"] for r in log] == list(range(1, len(log) + 1)) and txn["seq"] == len(log)
        for before, after in itertools.pairwise(log):
            stepped_down = RANK[after["status"]] < RANK[before["status"]]
            assert not stepped_down or '"last_error":{' in after["data"], (before["status"], after["status"])
