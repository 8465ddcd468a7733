"""Early events: one that names a transaction not written yet is parked, then applied by
the database transaction that writes the row."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import asyncpg
import pytest

from paystream.changes import store, transitions
from paystream.changes.lifecycle import BEFORE_STRIPE, Change
from paystream.dev import trigger
from paystream.ingest import webhooks


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database_url, init=store.init_connection, min_size=1, max_size=2)
    yield p
    await p.close()


async def test_an_event_for_a_row_not_written_yet_is_parked_then_applied(pool: asyncpg.Pool) -> None:
    txn_id, pi = store.new_transaction_id(), trigger.stripe_id("pi_")
    event = trigger.build("payment_intent.succeeded", pi, amount=700, metadata={"transaction_id": txn_id})
    assert await webhooks.apply_event(pool, event, json.dumps(event), {}) == "parked"
    assert await webhooks.apply_event(pool, event, json.dumps(event), {}) == "duplicate"
    assert await store.get_transaction(pool, pi) is None

    async with pool.acquire() as conn, conn.transaction():  # what POST /v1/transactions does
        await transitions.lock_for_writing(conn, txn_id)
        await transitions.create(conn, txn_id=txn_id, stripe_id=None, kind="payment", amount=700,
                                 currency="usd", customer_id=None, metadata={},
                                 change=Change("requires_payment_method", BEFORE_STRIPE),
                                 stripe_event_id=None, cause_type="paystream.transaction.created")
        assert await transitions.unpark(conn, txn_id) == 1

    row = await store.get_transaction(pool, txn_id)
    assert (row["status"], row["stripe_id"], row["seq"]) == ("succeeded", pi, 2)
    stored = await pool.fetchrow("SELECT processed_at, outcome FROM stripe_events WHERE id = $1", event["id"])
    assert stored["processed_at"] is not None and stored["outcome"] == "applied"
    assert await pool.fetchval("SELECT count(*) FROM parked_events WHERE transaction_id = $1", txn_id) == 0
