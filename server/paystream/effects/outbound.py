"""Built-in effect: every logged event is queued for the merchant's backend as a signed
Standard Webhooks message (PAYSTREAM_OUTBOUND_URL), in the database transaction that logs
it, so no event is logged without its message nor queued without being logged.  The queue
NOTIFYs the deliverers' wake-up channel, except with the broker (PAYSTREAM_BROKER), whose
commits take no NOTIFY lock: there the process that publishes the event wakes its own.

Only a pointer (transaction, seq) is queued: the worker (paystream.outbound.delivery)
reads the message's data from the event log when it sends it, which is exactly the pushed
event, with the fields later effects add.  A row queued behind an undelivered earlier one
of its transaction waits (next_attempt_at NULL) until that one is delivered or fails: the
caller holds the transaction's row lock, and the worker takes a share lock on it before
it moves on to the next, so the two never miss each other."""

from __future__ import annotations

from typing import Any

import asyncpg

from paystream.changes import store

OUTBOUND_CHANNEL = "paystream_outbound"


def webhook_id(transaction_id: str, seq: int) -> str:
    """The message's webhook-id: stable across retries and replays, unique per logged event."""
    return f"msg_{transaction_id.removeprefix('txn_')}_{seq}"


class OutboundWebhooks:
    name = "outbound"

    def __init__(self) -> None:
        self.enabled: bool | None = None  # read once from the settings, on first use

    def _configured(self) -> bool:
        if self.enabled is None:
            from paystream.config import Settings

            self.enabled = bool(Settings().outbound_url)
        return self.enabled

    async def on_status(self, conn: asyncpg.Connection, transaction: dict[str, Any],
                        previous_status: str | None) -> dict[str, Any] | None:
        if not self._configured():
            return None
        await conn.execute(
            """WITH queued AS (
                 INSERT INTO outbound_deliveries (webhook_id, transaction_id, seq, next_attempt_at)
                 SELECT $1, $2, $3,
                        CASE WHEN EXISTS (SELECT FROM outbound_deliveries
                                           WHERE transaction_id = $2 AND seq < $3
                                             AND delivered_at IS NULL AND failed_at IS NULL)
                             THEN NULL ELSE clock_timestamp() END
                 RETURNING 1)
               SELECT pg_notify($4, '') FROM queued WHERE $5""",
            webhook_id(transaction["id"], transaction["seq"]), transaction["id"], transaction["seq"],
            OUTBOUND_CHANNEL, not store.broker)
        return None


effect = OutboundWebhooks()
