"""The webhook's two merged statements: store-and-lock, and move-log-notify-finish."""

from __future__ import annotations

import json

import asyncpg
import pytest

from paystream.changes import store, transitions
from paystream.changes.lifecycle import Change, stripe_now
from paystream.dev import trigger


@pytest.fixture
async def db(isolated: tuple[str, asyncpg.Connection]) -> asyncpg.Connection:
    """A database of this test's own: these tests write rows past the effects (no ledger
    entries), which the suite's closing `paystream ledger --check` would rightly report."""
    return isolated[1]


async def _new(db: asyncpg.Connection) -> asyncpg.Record:
    pi = trigger.stripe_id("pi_")
    async with db.transaction():
        row = await store.insert_transaction(db, stripe_id=pi, kind="payment", status="processing", amount=100,
                                             currency="usd", customer_id=None, metadata={})
        await store.append_event(db, row, previous_status=None, stripe_event_id=None, event_type=None)
    return row


async def test_record_and_lock_stores_the_event_and_locks_its_transaction(
        db: asyncpg.Connection, isolated: tuple[str, asyncpg.Connection]) -> None:
    database_url = isolated[0]
    row = await _new(db)
    event = trigger.build("payment_intent.succeeded", row["stripe_id"])
    async with db.transaction():
        stored, locked = await store.record_and_lock(db, event, json.dumps(event), {}, row["stripe_id"])
        assert (stored["processed_at"], stored["outcome"]) == (None, None)
        assert locked is not None and (locked["id"], locked["seq"]) == (row["id"], 1)
        # Locked: another session cannot take the row until this transaction ends.
        other = await asyncpg.connect(database_url)
        try:
            with pytest.raises(asyncpg.LockNotAvailableError):
                await other.execute("SELECT 1 FROM transactions WHERE id = $1 FOR UPDATE NOWAIT", row["id"])
        finally:
            await other.close()
    assert await db.fetchval("SELECT attempts FROM stripe_events WHERE id = $1", event["id"]) == 1


async def test_record_and_lock_counts_a_repeat_and_finds_no_row_for_an_unknown_object(
        db: asyncpg.Connection) -> None:
    event = trigger.build("payment_intent.succeeded", trigger.stripe_id("pi_"))
    for attempt in (1, 2):
        async with db.transaction():
            stored, locked = await store.record_and_lock(db, event, json.dumps(event), {}, event["data"]["object"]["id"])
        assert locked is None
        assert await db.fetchval("SELECT attempts FROM stripe_events WHERE id = $1", event["id"]) == attempt


async def test_move_and_log_pushes_exactly_the_stored_row_and_finishes_the_event(db: asyncpg.Connection) -> None:
    row = await _new(db)
    event = trigger.build("payment_intent.succeeded", row["stripe_id"])
    async with db.transaction():
        _, locked = await store.record_and_lock(db, event, json.dumps(event), {}, row["stripe_id"])
        moved = transitions.next_row(locked, Change("succeeded", stripe_now()))
        await store.move_and_log(db, moved, previous_status="processing", stripe_event_id=event["id"],
                                 event_type=event["type"], finish_event=True)
    stored = await store.get_transaction(db, row["id"])
    logged = json.loads(await db.fetchval(
        "SELECT data::text FROM transaction_events WHERE transaction_id = $1 AND seq = 2", row["id"]))
    # What a stream replays is what a snapshot reads, to the microsecond of updated_at.
    assert {k: logged[k] for k in store.render(stored)} == store.render(stored)
    assert logged["previous_status"] == "processing" and logged["cause"]["stripe_event_id"] == event["id"]
    assert stored["updated_at"] > row["updated_at"]
    finished = await db.fetchrow("SELECT processed_at, outcome, transaction_id FROM stripe_events WHERE id = $1",
                                 event["id"])
    assert finished["processed_at"] is not None and finished["outcome"] == "applied"
    assert finished["transaction_id"] == row["id"]


async def test_move_and_log_refuses_a_row_that_moved_meanwhile(db: asyncpg.Connection) -> None:
    row = await _new(db)
    stale = transitions.next_row(row, Change("requires_action", stripe_now()))
    async with db.transaction():
        locked = await store.lock_by_id(db, row["id"])
        await store.move_and_log(db, transitions.next_row(locked, Change("succeeded", stripe_now())),
                                 previous_status="processing", stripe_event_id=None, event_type=None)
    with pytest.raises(RuntimeError, match="not at seq 1"):
        async with db.transaction():
            await store.move_and_log(db, stale, previous_status="processing", stripe_event_id=None, event_type=None)
    after = await store.get_transaction(db, row["id"])
    assert (after["status"], after["seq"]) == ("succeeded", 2)
    assert await db.fetchval("SELECT max(seq) FROM transaction_events WHERE transaction_id = $1", row["id"]) == 2



def test_a_notification_carries_the_pushed_event_byte_for_byte_when_it_fits() -> None:
    text = json.dumps({"id": "txn_X", "status": "succeeded", "metadata": {"k": "v,\"data\":x"}},
                      separators=(",", ":"))
    payload = store.notify_payload("txn_X", 7, "succeeded", text)
    assert store.notified_event(payload) == ("txn_X", 7, "succeeded", text)
    assert json.loads(payload)["seq"] == 7  # still plain JSON for any reader


def test_a_notification_too_big_for_postgres_is_a_pointer() -> None:
    text = json.dumps({"metadata": {"k": "x" * 8000}})
    payload = store.notify_payload("txn_X", 7, "succeeded", text)
    assert len(payload) < 100
    assert store.notified_event(payload) == ("txn_X", 7, "succeeded", None)
