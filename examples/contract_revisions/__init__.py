"""Example effect (Python): a design-review platform sells extra revision rounds.

Each $150 paid on a transaction whose metadata names a `contractId` grants 2 revisions
to that contract; a contract has 3 included, so available = 3 + purchased - used.  A
dispute that takes the money back takes the grant back; won, it gives it back.
Enable it with PAYSTREAM_EFFECTS=examples.contract_revisions:effect (with the checkout's
root on PYTHONPATH) and apply its schema with `paystream migrate` (it brings its own
migrations folder).  Written only against paystream's public effect interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REVISION_PRICE = 15000  # cents: each $150 buys two revisions
REVISIONS_PER_PURCHASE = 2
# The statuses at and after the money arrived (a dispute or refund follows a success).
PAID = ("succeeded", "partially_refunded", "refunded", "disputed")
# Dispute statuses under which the money was taken back (an inquiry, warning_*, takes nothing).
FUNDS_WITHDRAWN = ("needs_response", "under_review", "won", "lost")


class ContractRevisions:
    name = "contract_revisions"
    migrations = Path(__file__).parent / "migrations"

    async def on_status(self, conn: Any, transaction: dict[str, Any],
                        previous_status: str | None) -> dict[str, Any] | None:
        contract = transaction["metadata"].get("contractId")
        if not isinstance(contract, str) or not contract or transaction["status"] not in PAID:
            return None
        revisions = REVISIONS_PER_PURCHASE * (transaction["amount"] // REVISION_PRICE)
        # Keyed by the transaction: a second event after success (a refund, say) finds
        # the purchase already recorded and grants nothing more.
        await conn.execute(
            """INSERT INTO contract_purchases (payment_intent_id, contract_id, transaction_id, revisions, amount)
               VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING""",
            transaction["stripe_id"] or transaction["id"], contract, transaction["id"], revisions,
            transaction["amount"])
        dispute = transaction.get("dispute")
        if dispute and dispute.get("status") in FUNDS_WITHDRAWN:
            # While a dispute holds the money the purchase grants nothing; won, it grants again.
            taken = await conn.fetchval(
                "SELECT revisions FROM contract_purchases WHERE transaction_id = $1", transaction["id"])
            adjustments = [(f"dispute:{transaction['id']}:{dispute['id']}", -taken)] if taken else []
            if taken and dispute["status"] == "won":
                adjustments.append((f"dispute_won:{transaction['id']}:{dispute['id']}", taken))
            for key, revisions in adjustments:
                await conn.execute(
                    """INSERT INTO contract_adjustments (key, contract_id, revisions) VALUES ($1, $2, $3)
                       ON CONFLICT DO NOTHING""", key, contract, revisions)
        available = await conn.fetchval(
            "SELECT available FROM contract_revisions WHERE contract_id = $1", contract)
        return {"revisions": {"contract_id": contract, "available": available}}


effect = ContractRevisions()
