"""examples/ad_sales, the seed's rule as a SQL-function effect, on the real server
(tests/conftest.py enables the examples): a paid sale with the three ids is stored once."""

from __future__ import annotations

import random

import asyncpg
import pytest

from paystream.dev import trigger
from tests.support import Paystream

pytestmark = pytest.mark.e2e

SALE = {"advertiserId": "adv_1", "sizeId": "half_page", "publicationId": "pub_7"}


async def test_a_paid_sale_is_stored_once(ps: Paystream, db: asyncpg.Connection) -> None:
    pi = trigger.stripe_id("pi_")
    events = [ps.event("payment_intent.processing", pi, amount=9900, metadata=SALE),
              ps.event("payment_intent.succeeded", pi, amount=9900, metadata=SALE)]
    deliveries = events * 3
    random.shuffle(deliveries)
    for event in deliveries:
        await ps.deliver(event)
    rows = await db.fetch("SELECT advertiser_id, size_id, publication_id, amount, currency FROM ad_sales"
                          " WHERE payment_intent_id = $1", pi)
    assert [tuple(r) for r in rows] == [("adv_1", "half_page", "pub_7", 9900, "usd")]


@pytest.mark.parametrize("metadata", [{**SALE, "sizeId": ""}, {"advertiserId": "adv_1"}, {}])
async def test_a_sale_without_all_three_ids_is_not_stored(
        ps: Paystream, db: asyncpg.Connection, metadata: dict) -> None:
    pi = trigger.stripe_id("pi_")
    await ps.deliver(ps.event("payment_intent.succeeded", pi, metadata=metadata))
    assert await db.fetchval("SELECT count(*) FROM ad_sales WHERE payment_intent_id = $1", pi) == 0


async def test_a_pending_sale_is_not_stored(ps: Paystream, db: asyncpg.Connection) -> None:
    pi = trigger.stripe_id("pi_")
    await ps.deliver(ps.event("payment_intent.processing", pi, metadata=SALE))
    assert await db.fetchval("SELECT count(*) FROM ad_sales WHERE payment_intent_id = $1", pi) == 0
