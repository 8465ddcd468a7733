"""Built-in effect: a card validation's $1 authorisation is released once it has done
its job (reached requires_capture).  The Stripe call cannot run inside the database
transaction, so the effect queues it in the outbox (unique per transaction) and wakes the
recovery loop (by NOTIFY; with the broker, PAYSTREAM_BROKER, the process that publishes
the event wakes it), which cancels the PaymentIntent after commit with an idempotency key."""

from __future__ import annotations

from typing import Any

import asyncpg

from paystream.changes import store

OUTBOX_CHANNEL = "paystream_outbox"


class CardValidationRelease:
    name = "card_validation"

    async def on_status(self, conn: asyncpg.Connection, transaction: dict[str, Any],
                        previous_status: str | None) -> dict[str, Any] | None:
        if (transaction["kind"] == "card_validation" and transaction["status"] == "requires_capture"
                and (transaction["stripe_id"] or "").startswith("pi_")):
            await conn.execute(
                """WITH queued AS (
                     INSERT INTO outbox (kind, transaction_id) VALUES ('cancel_validation', $1)
                     ON CONFLICT DO NOTHING RETURNING 1)
                   SELECT pg_notify($2, $1) FROM queued WHERE $3""",
                transaction["id"], OUTBOX_CHANNEL, not store.broker)
        return None


effect = CardValidationRelease()
