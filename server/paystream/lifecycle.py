"""The status state machine: ranks, allowed transitions, and which late event wins.

Mirrors paystream_transition_allowed() in db/migrations/001_core.sql; the database
refuses anything this module would refuse, so a bug here cannot corrupt a status.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

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

# A browser waiting on one of these has its answer; streams close after them.
FINAL: frozenset[str] = frozenset({"succeeded", "canceled", "refunded"})


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


@dataclass(frozen=True, slots=True)
class Change:
    """What one Stripe event says about a transaction's status."""

    status: str
    at: datetime  # the Stripe event's `created`
    last_error: dict[str, Any] | None = None

    @property
    def declined(self) -> bool:
        return self.last_error is not None


@dataclass(frozen=True, slots=True)
class State:
    status: str
    at: datetime | None
    last_error: dict[str, Any] | None = None


def should_apply(current: State, change: Change) -> bool:
    """Does this event move the transaction, given what it already holds?

    Stripe delivers in any order, so the answer depends only on the pair, never on
    arrival order. The final state is the same for any permutation:
    * success and everything after it wins over anything earlier (ranks only grow);
    * a decline (back to requires_payment_method with last_error) applies only before
      success, and only if it is not older than the state it would replace;
    * a pre-success step that is not newer than a decline we hold happened before that
      decline: applying it would hide the decline.  (Equal timestamps: Stripe's are whole
      seconds, and a step then a decline in one second is the common case.)
    """
    if change.declined:
        if not is_pre_success(current.status):
            return False
        if current.at is not None and change.at < current.at:
            return False
        return (current.status, current.last_error) != (change.status, change.last_error)
    if change.status == current.status:
        return False
    if not transition_allowed(current.status, change.status, declined=False):
        return False
    if (
        is_pre_success(change.status)
        and current.last_error is not None
        and current.at is not None
        and change.at <= current.at
    ):
        return False
    return True
