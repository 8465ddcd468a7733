"""What a transaction's success does, by its route: run inside the database transaction
that moves it, each effect keyed uniquely so that no replay can apply it twice."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg

from paystream.lifecycle import REFUNDABLE, is_pre_success

log = logging.getLogger("paystream.effects")

REVISION_PRICE = 15000  # cents: each $150 buys two revisions
REVISIONS_PER_PURCHASE = 2
AD_SALE_KEYS = ("advertiserId", "sizeId", "publicationId")
CLEARING = "stripe:clearing"


def route_of(kind: str, metadata: dict[str, Any]) -> str:
    """Decided once, from metadata alone (no lookups), when the transaction is created."""
    if kind == "wallet_top_up":
        return "wallet"
    if isinstance(metadata.get("contractId"), str) and metadata["contractId"]:
        return "contract"
    if all(isinstance(metadata.get(k), str) and metadata[k] for k in AD_SALE_KEYS):
        return "ad_sale"
    if set(metadata) - {"transaction_id", "paystream_kind"}:
        return "unrouted"  # metadata we do not understand: kept, visible to operators
    return "transaction"


def wallet_account(customer_id: str) -> str:
    return f"wallet:{customer_id}"


async def wallet_balance(conn: asyncpg.Connection, customer_id: str) -> int:
    return await conn.fetchval(
        "SELECT coalesce(sum(amount), 0)::bigint FROM ledger_entries WHERE account = $1",
        wallet_account(customer_id))


async def _post(conn: asyncpg.Connection, group: str, txn: asyncpg.Record, wallet_amount: int) -> bool:
    """A balanced pair: the wallet moves by wallet_amount, clearing by its opposite."""
    inserted = await conn.fetchval(
        """WITH rows AS (
             INSERT INTO ledger_entries (entry_group, transaction_id, account, amount, currency)
             VALUES ($1, $2, $3, $4, $5), ($1, $2, $6, -$4::bigint, $5)
             ON CONFLICT (entry_group, account) DO NOTHING RETURNING 1)
           SELECT count(*) FROM rows""",
        group, txn["id"], wallet_account(txn["customer_id"]), wallet_amount, txn["currency"], CLEARING)
    return inserted > 0


async def after_move(conn: asyncpg.Connection, before: asyncpg.Record | None,
                     after: asyncpg.Record) -> dict[str, Any] | None:
    """Run the effects of `before` → `after`; return fields to add to the pushed event."""
    reached_success = after["status"] in REFUNDABLE and (before is None or is_pre_success(before["status"]))
    route = after["route"]
    pi = after["stripe_id"]
    if reached_success and route == "contract":
        revisions = REVISIONS_PER_PURCHASE * (after["amount"] // REVISION_PRICE)
        await conn.execute(
            """INSERT INTO contract_purchases (payment_intent_id, contract_id, transaction_id, revisions, amount)
               VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING""",
            pi or after["id"], after["metadata"]["contractId"], after["id"], revisions, after["amount"])
    elif reached_success and route == "ad_sale":
        meta = after["metadata"]
        await conn.execute(
            """INSERT INTO ad_sales (payment_intent_id, transaction_id, advertiser_id, size_id,
                                     publication_id, amount, currency)
               VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING""",
            pi or after["id"], after["id"], meta["advertiserId"], meta["sizeId"], meta["publicationId"],
            after["amount"], after["currency"])
    if (after["kind"] == "card_validation" and after["status"] == "requires_capture"
            and (pi or "").startswith("pi_")):
        # The $1 hold has done its job: release it (after commit, through the outbox).
        await conn.execute(
            "INSERT INTO outbox (kind, transaction_id) VALUES ('cancel_validation', $1) ON CONFLICT DO NOTHING",
            after["id"])
        await conn.execute("SELECT pg_notify('paystream_outbox', $1)", after["id"])
    if route != "wallet":
        return None
    if not after["customer_id"]:
        log.warning("wallet top-up without a customer: nothing credited",
                    extra={"transaction_id": after["id"]})
        return None
    if reached_success:
        await _post(conn, f"topup:{after['id']}", after, after["amount"])
    refunded_before = before["amount_refunded"] if before is not None else 0
    if after["amount_refunded"] > refunded_before and not is_pre_success(after["status"]):
        # A refund is a reversing entry for the refunded part, keyed by Stripe's running
        # total so the same refund reported twice reverses once.
        delta = after["amount_refunded"] - refunded_before
        await _post(conn, f"refund:{after['id']}:{after['amount_refunded']}", after, -delta)
    return {"balance": {"customer_id": after["customer_id"],
                        "amount": await wallet_balance(conn, after["customer_id"]),
                        "currency": after["currency"]}}
