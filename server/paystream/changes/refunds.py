"""Refund records (table `refunds`, db/migrations/012_refunds.sql): reserving one made
through paystream, recording what Stripe says of it, adopting one made elsewhere, and
the change that puts a transaction's refunds (and, once they succeed, its refunded
total) into its JSON, logged and pushed like any move.  All inside the caller's
database transaction, with the transaction's row locked."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from ulid import ULID

from paystream.changes.machine import Change

RANK = {"pending": 0, "requires_action": 1, "succeeded": 2, "failed": 3, "canceled": 3}
# Statuses whose money is, or may yet be, refunded: what a new refund must fit beside.
HELD = ("pending", "requires_action", "succeeded")
# A transaction's statuses after its money was captured (only these can be refunded).
CAPTURED = ("succeeded", "partially_refunded", "refunded", "disputed")

_COLUMNS = "id, transaction_id, stripe_id, amount, currency, reason, metadata, status, failure_reason, origin"


def new_refund_id() -> str:
    return f"rf_{ULID()}"


def render(row: asyncpg.Record | dict[str, Any]) -> dict[str, Any]:
    """A refund as the transaction's JSON lists it."""
    return {"id": row["id"], "stripe_id": row["stripe_id"], "amount": row["amount"], "currency": row["currency"],
            "status": row["status"], "reason": row["reason"], "failure_reason": row["failure_reason"]}


def captured(txn: asyncpg.Record | dict[str, Any]) -> int:
    """What the transaction took: a partial capture's amount, else its amount."""
    details = txn.get("details") if isinstance(txn, dict) else txn["details"]
    value = (details or {}).get("amount_captured")
    return value if isinstance(value, int) and not isinstance(value, bool) else txn["amount"]


async def listing(conn: asyncpg.Connection | asyncpg.Pool, txn_id: str) -> list[asyncpg.Record]:
    return await conn.fetch(f"SELECT {_COLUMNS} FROM refunds WHERE transaction_id = $1 ORDER BY created_at, id",
                            txn_id)


# How long a request may hold a refund while it calls Stripe (see claimed_until).
CLAIM = timedelta(seconds=30)


async def by_key(conn: asyncpg.Connection, txn_id: str, key: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"""SELECT {_COLUMNS}, request_hash, claimed_until > clock_timestamp() AS claimed
              FROM refunds WHERE transaction_id = $1 AND idempotency_key = $2""", txn_id, key)


async def claim(conn: asyncpg.Connection, refund_id: str) -> None:
    await conn.execute("UPDATE refunds SET claimed_until = clock_timestamp() + $2::interval WHERE id = $1",
                       refund_id, CLAIM)


async def room(conn: asyncpg.Connection, txn: asyncpg.Record | dict[str, Any]) -> int:
    """What may still be refunded: captured, less what Stripe reports refunded or what
    refunds here hold (pending, requiring action or succeeded), whichever is more."""
    held = await conn.fetchval(
        "SELECT coalesce(sum(amount), 0)::bigint FROM refunds WHERE transaction_id = $1 AND status = ANY($2)",
        txn["id"], list(HELD))
    return captured(txn) - max(txn["amount_refunded"], held)


async def reserve(conn: asyncpg.Connection, txn: asyncpg.Record | dict[str, Any], *, amount: int,
                  reason: str | None, metadata: dict[str, str], key: str | None,
                  request_hash: str | None) -> asyncpg.Record:
    return await conn.fetchrow(
        f"""INSERT INTO refunds (id, transaction_id, amount, currency, reason, metadata, status, origin,
                                 idempotency_key, request_hash)
            VALUES ($1, $2, $3, $4, $5, $6, 'pending', 'paystream', $7, $8) RETURNING {_COLUMNS}""",
        new_refund_id(), txn["id"], amount, txn["currency"], reason, metadata, key, request_hash)


async def record(conn: asyncpg.Connection, refund_id: str, *, stripe_id: str | None, status: str,
                 failure_reason: str | None) -> asyncpg.Record:
    """What Stripe said of a refund: its id, and its status if that is a step forward."""
    return await conn.fetchrow(
        f"""UPDATE refunds SET stripe_id = coalesce(stripe_id, $2),
                  status = CASE WHEN paystream_refund_rank($3) > paystream_refund_rank(status)
                                 AND status NOT IN ('failed', 'canceled') THEN $3 ELSE status END,
                  failure_reason = coalesce($4, failure_reason), updated_at = clock_timestamp(),
                  claimed_until = NULL
            WHERE id = $1 RETURNING {_COLUMNS}""",
        refund_id, stripe_id, status if status in RANK else "pending", failure_reason)


async def adopt(conn: asyncpg.Connection, txn: asyncpg.Record | dict[str, Any],
                seen: Iterable[dict[str, Any]]) -> bool:
    """Refund objects an event carries, made here or elsewhere: each is recorded once
    (by its re_ id; one we made is found by the paystream_refund_id in its metadata) and
    its status only moves forward.  True if any record changed."""
    changed = False
    for refund in seen:
        ours = refund.get("paystream_refund_id")
        row = None
        if isinstance(ours, str):
            row = await conn.fetchrow(
                "SELECT id FROM refunds WHERE id = $1 AND transaction_id = $2", ours, txn["id"])
        if row is None:
            row = await conn.fetchrow("SELECT id FROM refunds WHERE stripe_id = $1", refund["id"])
        if row is None:
            if refund["amount"] <= 0:
                continue
            await conn.execute(
                """INSERT INTO refunds (id, transaction_id, stripe_id, amount, currency, reason, status,
                                        failure_reason, origin)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'stripe') ON CONFLICT (stripe_id) DO NOTHING""",
                new_refund_id(), txn["id"], refund["id"], refund["amount"], txn["currency"], refund.get("reason"),
                refund["status"], refund.get("failure_reason"))
            changed = True
            continue
        before = await conn.fetchval("SELECT status FROM refunds WHERE id = $1", row["id"])
        after = await record(conn, row["id"], stripe_id=refund["id"], status=refund["status"],
                             failure_reason=refund.get("failure_reason"))
        changed = changed or after["status"] != before
    return changed


async def change_for(conn: asyncpg.Connection, txn: asyncpg.Record | dict[str, Any], at: datetime) -> Change:
    """The change that shows the transaction's refunds as recorded now: its `refunds`
    list, and, when succeeded refunds add up to more than its refunded total, that total
    and the status it makes (partially_refunded, or refunded once all of it is)."""
    rows = await listing(conn, txn["id"])
    details = {**(txn["details"] or {}), "refunds": [render(r) for r in rows]}
    succeeded = sum(r["amount"] for r in rows if r["status"] == "succeeded")
    status, total = txn["status"], txn["amount_refunded"]
    if succeeded > total and status in ("succeeded", "partially_refunded", "refunded"):
        total = succeeded
        status = "refunded" if total >= captured(txn) else "partially_refunded"
    # No last_error: a change that also moves the status clears an earlier one, as a
    # charge.refunded does; one that only lists the refunds keeps it (the machine's
    # details rule builds that move from the state it holds).
    return Change(status, at, amount_refunded=total, dispute=txn["dispute"], details=details)
