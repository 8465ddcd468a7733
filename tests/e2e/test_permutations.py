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


# Subscriptions move both ways: Stripe's time orders them, not a rank.  Bodies are built
# in Stripe's subscription shape (API 2025-03-31: the period on the items) and signed like
# Stripe's; the ids are new to the emulator, so no event of its own interferes.
SUBSCRIPTION_SEQUENCES = {
    "created incomplete, paid, renewal failed, retry paid": (
        [("customer.subscription.created", "incomplete"), ("customer.subscription.updated", "active"),
         ("customer.subscription.updated", "past_due"), ("customer.subscription.updated", "active")], "active"),
    "updated before created, then canceled": (
        [("customer.subscription.created", "active"), ("customer.subscription.updated", "past_due"),
         ("customer.subscription.updated", "unpaid"), ("customer.subscription.deleted", "canceled")], "canceled"),
}


def subscription_event(event_type: str, sub: str, status: str, created: int) -> dict:
    obj = {"id": sub, "object": "subscription", "status": status, "customer": "cus_perm", "currency": "usd",
           "cancel_at_period_end": False, "trial_end": None, "metadata": {},
           "items": {"object": "list", "data": [{"id": "si_perm", "object": "subscription_item", "quantity": 1,
                                                 "current_period_end": 1_900_000_000,
                                                 "price": {"id": "price_perm", "unit_amount": 1500,
                                                           "currency": "usd"}}]}}
    return {"id": trigger.stripe_id("evt_"), "object": "event", "type": event_type, "created": created,
            "api_version": "2025-03-31.basil", "livemode": False, "data": {"object": obj}}


@pytest.mark.parametrize("name", list(SUBSCRIPTION_SEQUENCES))
async def test_every_permutation_of_a_subscription_ends_in_the_same_state(name: str, ps: Paystream) -> None:
    steps, expected = SUBSCRIPTION_SEQUENCES[name]
    finals = set()
    for order in itertools.permutations(range(len(steps))):
        sub, base = trigger.stripe_id("sub_"), int(time.time()) - 100
        events = [subscription_event(t, sub, s, base + i) for i, (t, s) in enumerate(steps)]
        for i in order:
            await ps.deliver(events[i])
            assert (await ps.deliver(events[i]))["outcome"] == "duplicate"
        txn = (await ps.get(sub)).json()
        finals.add((txn["status"], txn["kind"], txn["amount"], txn["current_period_end"], txn["last_error"] is None))
    assert finals == {(expected, "subscription", 1500, "2030-03-17T17:46:40Z", True)}
