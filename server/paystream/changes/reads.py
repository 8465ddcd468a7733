"""Reads of a subscription from Stripe that a change asks for, queued in the outbox in
the change's own database transaction and made after commit by the recovery loop
(payments/subscriptions.py applies what Stripe says):

* an event of the same second as the subscription's state that says something else
  (machine_subscription: Decision.reread) cannot be placed by time, so Stripe decides;
* an invoice of a subscription that moved (paid, failed): Stripe changes the
  subscription with it (active, past_due) and may send no customer.subscription.updated
  for that (localstripe never does), and the subscription shows the invoice's error.

A job already queued and not yet done covers a new ask; one done (or being read) starts
over, so the last read always follows the last change that asked for it."""

from __future__ import annotations

from typing import Any

import asyncpg

from paystream.changes import store
from paystream.effects.card_validation import OUTBOX_CHANNEL

_QUEUE = """WITH queued AS (
               INSERT INTO outbox (kind, transaction_id)
               SELECT 'read_subscription', id FROM transactions WHERE {where}
               ON CONFLICT (kind, transaction_id)
                  DO UPDATE SET done_at = NULL, attempts = 0, last_error = NULL
               RETURNING transaction_id)
            SELECT pg_notify($2, transaction_id) FROM queued WHERE $3"""


async def queue(conn: asyncpg.Connection, txn_id: str) -> None:
    """Read this subscription transaction's object from Stripe after commit."""
    await conn.execute(_QUEUE.format(where="id = $1"), txn_id, OUTBOX_CHANNEL, not store.broker)


async def after_move(conn: asyncpg.Connection, row: asyncpg.Record | dict[str, Any]) -> None:
    """An invoice of a subscription moved: read the subscription (if it is ours)."""
    if row["kind"] != "invoice":
        return
    subscription = (row.get("details") or {}).get("subscription_id")
    if subscription:
        await conn.execute(_QUEUE.format(where="stripe_id = $1 AND kind = 'subscription'"), subscription,
                           OUTBOX_CHANNEL, not store.broker)
