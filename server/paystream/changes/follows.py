"""Transactions that follow others (transaction_follows): a Checkout Session follows the
PaymentIntent, SetupIntent and subscription it made, which keep transactions of their
own.  What happens to the money after success (a refund, a dispute) is news for whoever
watches the session too, so it is applied to the follower as well, in the same database
transaction, with the same cause.

Either side may land first: the PaymentIntent's refund before the session's event that
names it, or after.  Both sides take one advisory lock per followed Stripe id, so that a
follow recorded concurrently with a move of the followed transaction is seen by one of
them: propagate() reads the followers after taking it; record() reads the followed
transaction after taking it (a new follow only), and catches the follower up."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import asyncpg

from paystream.changes import store
from paystream.changes.lifecycle import Change, stripe_now

# What a follower takes from the transaction it follows: the money's fate after success.
FOLLOWED_STATUSES = frozenset({"partially_refunded", "refunded", "disputed"})

Apply = Callable[..., Awaitable[tuple[bool, Any]]]


async def _lock(conn: asyncpg.Connection, stripe_id: str) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"paystream-follow:{stripe_id}")


def _fits(follower: asyncpg.Record | None, change: Change) -> bool:
    """A follower takes no refund or dispute larger than its own amount (a session of
    several payments is not followed this way)."""
    if follower is None:
        return False
    larger = max(change.amount_refunded or 0, int((change.dispute or {}).get("amount") or 0))
    return larger <= follower["amount"]


def _change_of(row: asyncpg.Record | dict[str, Any]) -> Change:
    return Change(row["status"], row["status_at"] or stripe_now(), amount_refunded=row["amount_refunded"],
                  dispute=row["dispute"])


async def record(conn: asyncpg.Connection, follower_id: str, stripe_ids: Iterable[str], apply: Apply,
                 *, stripe_event_id: str | None, cause_type: str) -> None:
    """follower_id follows stripe_ids; a new follow takes on what the followed
    transaction already went through after success."""
    for stripe_id in stripe_ids:
        new = await conn.fetchval(
            """INSERT INTO transaction_follows (stripe_id, transaction_id) VALUES ($1, $2)
               ON CONFLICT DO NOTHING RETURNING true""", stripe_id, follower_id)
        if not new:
            continue
        await _lock(conn, stripe_id)
        followed = await store.get_transaction(conn, stripe_id)
        if followed is not None and followed["status"] in FOLLOWED_STATUSES:
            row = await store.lock_by_id(conn, follower_id)
            if _fits(row, _change_of(followed)):
                await apply(conn, row, _change_of(followed), stripe_event_id=stripe_event_id,
                            cause_type=cause_type)


async def propagate(conn: asyncpg.Connection, followed: asyncpg.Record | dict[str, Any], apply: Apply,
                    *, stripe_event_id: str | None, cause_type: str) -> None:
    """Apply the followed transaction's new state (after a move to FOLLOWED_STATUSES) to
    every transaction that follows its Stripe object."""
    if not followed["stripe_id"] or followed["status"] not in FOLLOWED_STATUSES:
        return
    await _lock(conn, followed["stripe_id"])
    for rec in await conn.fetch(
            "SELECT transaction_id FROM transaction_follows WHERE stripe_id = $1 ORDER BY transaction_id",
            followed["stripe_id"]):
        row = await store.lock_by_id(conn, rec["transaction_id"])
        if row is not None and row["id"] != followed["id"] and _fits(row, _change_of(followed)):
            await apply(conn, row, _change_of(followed), stripe_event_id=stripe_event_id, cause_type=cause_type)


async def followed_by(conn: asyncpg.Connection | asyncpg.Pool, txn_ids: Iterable[str],
                      stripe_ids: Iterable[str]) -> set[str]:
    """The Stripe ids followed by the transactions named (by txn_ id or Stripe id)."""
    rows = await conn.fetch(
        """SELECT f.stripe_id FROM transaction_follows f JOIN transactions t ON t.id = f.transaction_id
            WHERE t.id = ANY($1::text[]) OR t.stripe_id = ANY($2::text[])""", list(txn_ids), list(stripe_ids))
    return {r["stripe_id"] for r in rows}
