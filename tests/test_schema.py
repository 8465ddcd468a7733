"""The database itself refuses what would corrupt a status or the log."""

from __future__ import annotations

import itertools
import json

import asyncpg
import pytest

from paystream.changes import store
from paystream.changes.lifecycle import STATUSES, transition_allowed


@pytest.fixture
async def db(isolated: tuple[str, asyncpg.Connection]) -> asyncpg.Connection:
    """A database of this test's own: these tests write rows past the effects (no ledger
    entries), which the suite's closing `paystream ledger --check` would rightly report."""
    return isolated[1]


async def test_sql_and_python_agree_on_every_transition(db: asyncpg.Connection) -> None:
    for old, new, declined in itertools.product(STATUSES, STATUSES, (False, True)):
        sql = await db.fetchval("SELECT paystream_transition_allowed($1, $2, $3)", old, new, declined)
        assert sql == transition_allowed(old, new, declined), (old, new, declined)


async def _new(db: asyncpg.Connection, status: str = "processing") -> asyncpg.Record:
    async with db.transaction():
        row = await store.insert_transaction(
            db, stripe_id=f"pi_{store.new_transaction_id()[4:]}", kind="payment", status=status,
            amount=100, currency="usd", customer_id=None, metadata={})
        await store.append_event(db, row, previous_status=None, stripe_event_id=None, event_type=None)
    return row


async def test_a_status_cannot_step_down(db: asyncpg.Connection) -> None:
    row = await _new(db, "succeeded")
    with pytest.raises(asyncpg.CheckViolationError, match="may not move"):
        await db.execute("UPDATE transactions SET status = 'processing', seq = seq + 1 WHERE id = $1", row["id"])
    with pytest.raises(asyncpg.CheckViolationError, match="may not move"):
        await db.execute(
            "UPDATE transactions SET status = 'requires_payment_method', last_error = '{}', seq = seq + 1"
            " WHERE id = $1", row["id"])


async def test_a_decline_may_step_down_before_success(db: asyncpg.Connection) -> None:
    row = await _new(db, "requires_action")
    await db.execute(
        "UPDATE transactions SET status = 'requires_payment_method', last_error = $2, seq = seq + 1"
        " WHERE id = $1", row["id"], {"code": "card_declined"})
    assert await db.fetchval("SELECT status FROM transactions WHERE id = $1", row["id"]) == "requires_payment_method"


async def test_unknown_status_and_bad_ids_are_refused(db: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await _new(db, "paid")
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("INSERT INTO transactions (id, kind, status, amount, currency)"
                         " VALUES ('txn_short', 'payment', 'processing', 1, 'usd')")


async def test_seq_grows_by_one_and_the_log_matches_it(db: asyncpg.Connection) -> None:
    row = await _new(db)
    with pytest.raises(asyncpg.CheckViolationError, match="grow by one"):
        await db.execute("UPDATE transactions SET seq = seq + 2 WHERE id = $1", row["id"])
    with pytest.raises(asyncpg.CheckViolationError, match="does not match"):
        await db.execute(
            "INSERT INTO transaction_events (transaction_id, seq, status, data) VALUES ($1, 5, 'processing', '{}')",
            row["id"])
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(
            "INSERT INTO transaction_events (transaction_id, seq, status, data) VALUES ($1, 1, 'processing', '{}')",
            row["id"])


async def test_the_log_is_append_only(db: asyncpg.Connection) -> None:
    row = await _new(db)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await db.execute("UPDATE transaction_events SET status = 'succeeded' WHERE transaction_id = $1", row["id"])
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await db.execute("DELETE FROM transaction_events WHERE transaction_id = $1", row["id"])


async def test_pushed_json_is_kept_byte_for_byte(db: asyncpg.Connection) -> None:
    row = await _new(db)
    text = await db.fetchval("SELECT data::text FROM transaction_events WHERE transaction_id = $1", row["id"])
    assert list(json.loads(text))[:3] == ["id", "stripe_id", "kind"]  # contract order, not jsonb's
    assert " " not in text.split('"metadata"')[0]


async def test_migrations_are_recorded_and_idempotent(
        isolated: tuple[str, asyncpg.Connection], db: asyncpg.Connection) -> None:
    database_url = isolated[0]
    from paystream.db import migrate, migration_files, missing_migrations
    from tests.harness import EXAMPLE_MIGRATIONS

    assert await migrate(database_url, EXAMPLE_MIGRATIONS) == []
    versions = [r["version"] for r in await db.fetch(
        "SELECT version FROM paystream_schema_version WHERE component = 'paystream' ORDER BY 1")]
    assert versions == [m.version for m in migration_files()]
    assert await missing_migrations(db, EXAMPLE_MIGRATIONS) == []
    examples = {r["component"] for r in await db.fetch("SELECT component FROM paystream_schema_version")}
    assert {"paystream", *EXAMPLE_MIGRATIONS} <= examples  # other tests may add their own


async def test_a_database_behind_the_code_names_what_it_lacks(db: asyncpg.Connection, tmp_path) -> None:  # noqa: ANN001
    from paystream.db import missing_migrations

    extra = tmp_path / "migrations"
    extra.mkdir()
    (extra / "001_later.sql").write_text("SELECT 1")
    assert await missing_migrations(db, {"later": extra}) == ["later/001_later.sql"]
