"""The payment machine: PaymentIntents, SetupIntents and the invoices they pay (kinds
payment, card_validation, wallet_top_up, invoice): ranks, allowed transitions, and which
late event wins.

Mirrors paystream_transition_allowed() in db/migrations/001_core.sql; the database
refuses anything this module would refuse, so a bug here cannot corrupt a status.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from paystream.changes.machine import IGNORE, Change, Decision, State

RANK: dict[str, int] = {
    "requires_payment_method": 0,
    "requires_confirmation": 1,
    "requires_action": 2,
    "processing": 3,
    "requires_capture": 4,
    "succeeded": 5,
    "canceled": 5,
    "partially_refunded": 6,
    "refunded": 7,
    "disputed": 8,
}
STATUSES: tuple[str, ...] = tuple(RANK)
SUCCEEDED_RANK = RANK["succeeded"]

FINAL: frozenset[str] = frozenset({"succeeded", "canceled", "refunded"})


REFUNDABLE: frozenset[str] = frozenset({"succeeded", "partially_refunded", "refunded", "disputed"})


def is_pre_success(status: str) -> bool:
    return RANK[status] < SUCCEEDED_RANK


def transition_allowed(old: str, new: str, declined: bool) -> bool:
    if old == new:
        return True
    if old == "canceled":
        return False
    if new == "canceled":
        return is_pre_success(old)
    if new == "requires_payment_method" and declined:
        return is_pre_success(old)
    return RANK[new] > RANK[old]


# Stripe moves a PaymentIntent down only through a failed attempt.  A newer event at a
# lower rank than the one we hold proves an attempt failed in between, even if that
# decline event has not reached us (yet): we log the decline, then the step.
INFERRED_DECLINE: dict[str, Any] = {
    "code": "attempt_failed",
    "message": "an earlier payment attempt failed (inferred from a later retry)",
}


# A dispute's progress, as far as the money goes: an inquiry (no funds withdrawn yet),
# a chargeback (funds withdrawn), closed (won, lost, or an inquiry closed).  A dispute's
# own status moves through these in order; later Stripe statuses within one stage
# (needs_response → under_review) are not news for the browser or the ledger.
_DISPUTE_STAGE = {"warning_needs_response": 0, "warning_under_review": 0, "needs_response": 1,
                  "under_review": 1, "warning_closed": 2, "won": 2, "lost": 2}
DISPUTE_FUNDS_WITHDRAWN = frozenset({"needs_response", "under_review", "won", "lost"})


def dispute_stage(dispute: dict[str, Any] | None) -> int:
    if dispute is None:
        return -1
    return _DISPUTE_STAGE.get(str(dispute.get("status")), 1)  # an unknown status: an open chargeback


def _decide(current: State, change: Change) -> Decision:
    """What one event does to a transaction, given what it already holds.

    Stripe delivers in any order, so the result may depend only on the set of events,
    never on their arrival order:
    * success and everything after it wins over anything before it; ranks only grow;
    * before success, the newest event says where the attempt stands (a customer can
      fail and retry, so ranks alone cannot order them).  Stripe's timestamps are whole
      seconds: in a tie a decline wins (a step then its failure in one second is the
      usual case), then the higher rank.
    """
    if change.dispute is not None:
        return _decide_dispute(current, change)
    if change.refund_error is not None:
        if current.status in REFUNDABLE and current.last_error != change.refund_error:
            return Decision((Change(current.status, change.at, last_error=change.refund_error,
                                    amount_refunded=current.amount_refunded),))
        return IGNORE
    if change.status == "canceled" and change.declined and is_pre_success(current.status):
        # A failure that ends the attempt for good (a Checkout Session's delayed payment
        # failed: no retry on that session), newer or older than the step it ends.
        return Decision((change,))
    if not (is_pre_success(current.status) and is_pre_success(change.status)):
        if change.status == current.status and change.amount_refunded is not None:
            # Several partial refunds: Stripe reports a growing total; a smaller one is late.
            return Decision((change,)) if change.amount_refunded > current.amount_refunded else IGNORE
        if change.declined or change.status == current.status:
            return IGNORE
        if not transition_allowed(current.status, change.status, declined=False):
            return IGNORE
        return Decision((change,))
    if current.at is not None and change.at < current.at:
        return IGNORE  # delivered late: a newer event already set the state
    newer = current.at is None or change.at > current.at
    if change.declined:
        if (current.status, current.last_error) == (change.status, change.last_error):
            return Decision(touch=newer)
        return Decision((change,))
    if current.last_error is not None and not newer:
        return IGNORE
    if RANK[change.status] > RANK[current.status]:
        return Decision((change,))
    if change.status == current.status or not newer:
        return Decision(touch=newer)
    decline = Change("requires_payment_method", change.at, INFERRED_DECLINE)
    if change.status == "requires_payment_method":
        return Decision((decline,))
    return Decision((decline, change))


def _decide_dispute(current: State, change: Change) -> Decision:
    """A dispute moves a transaction to `disputed` (from any status but canceled, even
    before the success it follows arrives: success can no longer change it), and each
    later stage of the same dispute is logged once (an inquiry becoming a chargeback, its
    closing as won or lost); an older stage delivered late changes nothing."""
    if current.status != "disputed":
        if not transition_allowed(current.status, "disputed", declined=False):
            return IGNORE
        return Decision((change,))
    if dispute_stage(change.dispute) > dispute_stage(current.dispute):
        return Decision((Change("disputed", change.at, dispute=change.dispute,
                                amount_refunded=current.amount_refunded),))
    return IGNORE


def decide(current: State, change: Change) -> Decision:
    """What one event does to a transaction, given what it already holds (see _decide).

    `details` (an invoice's subscription_id) only ever adds what some event knows: the
    moves carry the union, and a change that adds a field but no status is logged as
    news at the status held, so every order of delivery ends with every field."""
    decision = _decide(current, change)
    if not change.details:
        return decision
    merged = {**change.details, **(current.details or {})}
    if "refunds" in change.details:  # the refund records as they stand now (changes/refunds.py): newest wins
        merged["refunds"] = change.details["refunds"]
    if decision.moves:
        return Decision(tuple(replace(m, details={**merged, **(m.details or {})}) for m in decision.moves),
                        decision.touch)
    if merged == (current.details or {}):
        return decision
    return Decision((Change(current.status, current.at or change.at, last_error=current.last_error,
                            amount_refunded=current.amount_refunded, dispute=current.dispute,
                            details=merged),), decision.touch)


class PaymentMachine:
    statuses = STATUSES
    final = FINAL

    def allowed(self, old: str, new: str, declined: bool) -> bool:
        return transition_allowed(old, new, declined)

    def decide(self, current: State, change: Change) -> Decision:
        return decide(current, change)


MACHINE = PaymentMachine()
