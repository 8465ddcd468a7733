"""Example effect (Python): the Observatory, a design-review platform, sells extra
revision rounds.

* A contract has 3 revisions included.  A payment whose metadata names a `contractId`
  buys 2 more only when it is exactly 15,000 in USD ($150); any other amount or currency
  credits nothing and is flagged for the merchant: a `contract_flags` row (reason
  `wrong_price`) and `revisions.flag` in the pushed event.
* A refund (of any part: the purchase is no longer $150 paid) or a dispute that withdrew
  the funds takes the 2 back; a dispute won gives them back, one lost does not.  When
  some of them were already used, the take-back leaves `available` below zero: the
  shortfall is flagged (`contract_flags`, reason `shortfall`, and `revisions.shortfall`
  in the pushed event), never clipped away.
* The product spends a revision with the SQL function `use_revision(contract_id)`, which
  refuses (check_violation) when none is left; `contract_available(contract_id)` reads
  any contract (3 for one no one paid for), the view `contract_revisions` every contract
  with a purchase, adjustment or use: available = 3 + purchased − used.

Enable it with PAYSTREAM_EFFECTS=examples.contract_revisions:effect (with the checkout's
root on PYTHONPATH) and apply its schema with `paystream migrate` (it brings its own
migrations folder).  Written only against paystream's public effect interface.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REVISION_PRICE = 15000  # exactly this, in cents
REVISION_CURRENCY = "usd"
REVISIONS_PER_PURCHASE = 2
# The statuses at and after the money arrived (a dispute or refund follows a success).
PAID = ("succeeded", "partially_refunded", "refunded", "disputed")
# Dispute statuses under which the money is gone from the merchant: a chargeback still
# open, or lost.  (An inquiry, warning_*, takes nothing; won gives the money back.)
FUNDS_GONE = ("needs_response", "under_review", "lost")


def _grant_now(transaction: dict[str, Any], granted: int) -> int:
    """What the purchase grants given everything that happened to its money."""
    dispute = transaction.get("dispute") or {}
    if transaction.get("amount_refunded") or dispute.get("status") in FUNDS_GONE:
        return 0
    return granted


class ContractRevisions:
    name = "contract_revisions"
    migrations = Path(__file__).parent / "migrations"

    async def on_status(self, conn: Any, transaction: dict[str, Any],
                        previous_status: str | None) -> dict[str, Any] | None:
        contract = transaction["metadata"].get("contractId")
        if not isinstance(contract, str) or not contract or transaction["status"] not in PAID:
            return None
        txn_id = transaction["id"]
        # Take-backs and uses of this contract wait for each other (use_revision locks it too).
        await conn.execute("INSERT INTO contract_usage (contract_id, used) VALUES ($1, 0) ON CONFLICT DO NOTHING",
                           contract)
        await conn.execute("SELECT FROM contract_usage WHERE contract_id = $1 FOR UPDATE", contract)
        exact = transaction["amount"] == REVISION_PRICE and transaction["currency"] == REVISION_CURRENCY
        # Keyed by the transaction: a later event of it (a refund, say) finds the purchase
        # recorded and grants nothing more.
        await conn.execute(
            """INSERT INTO contract_purchases
                 (payment_intent_id, contract_id, transaction_id, revisions, amount, currency)
               VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING""",
            transaction["stripe_id"] or txn_id, contract, txn_id, REVISIONS_PER_PURCHASE if exact else 0,
            transaction["amount"], transaction["currency"])
        fields: dict[str, Any] = {"contract_id": contract}
        if not exact:
            await self._flag(conn, f"wrong_price:{txn_id}", contract, txn_id, "wrong_price",
                             {"amount": transaction["amount"], "currency": transaction["currency"],
                              "expected": {"amount": REVISION_PRICE, "currency": REVISION_CURRENCY}})
            fields["flag"] = "wrong_price"
        granted = await conn.fetchval(
            "SELECT revisions FROM contract_purchases WHERE transaction_id = $1", txn_id) or 0
        now = granted + await conn.fetchval(
            "SELECT coalesce(sum(revisions), 0)::integer FROM contract_adjustments WHERE transaction_id = $1", txn_id)
        change = _grant_now(transaction, granted) - now
        if change:
            # Keyed by the event (seq): each logged event adjusts at most once, and reading
            # what this transaction's grant stands at makes any order come out the same.
            reason = "restored" if change > 0 else ("refund" if transaction.get("amount_refunded") else "dispute")
            await conn.execute(
                """INSERT INTO contract_adjustments (key, contract_id, transaction_id, revisions)
                   VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING""",
                f"{reason}:{txn_id}:{transaction['seq']}", contract, txn_id, change)
        row = await conn.fetchrow(
            "SELECT available, shortfall, used FROM contract_revisions WHERE contract_id = $1", contract)
        if change < 0 and row["shortfall"] > 0:
            await self._flag(conn, f"shortfall:{txn_id}:{transaction['seq']}", contract, txn_id, "shortfall",
                             {"taken_back": -change, "used": row["used"], "shortfall": row["shortfall"]})
        fields.update(available=row["available"], shortfall=row["shortfall"])
        return {"revisions": fields}

    async def _flag(self, conn: Any, key: str, contract: str, txn_id: str, reason: str,
                    detail: dict[str, Any]) -> None:
        await conn.execute(
            """INSERT INTO contract_flags (key, contract_id, transaction_id, reason, detail)
               VALUES ($1, $2, $3, $4, $5::text::jsonb) ON CONFLICT DO NOTHING""",
            key, contract, txn_id, reason, json.dumps(detail))


effect = ContractRevisions()
