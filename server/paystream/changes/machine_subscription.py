"""The subscription machine (kind subscription): Stripe's subscription statuses, which
move both ways (active -> past_due -> active), so no rank can order them.  Stripe's time
does: an event older than the state it would replace changes nothing, a newer one sets
the state, and one of the same second (Stripe's `created` has one-second resolution)
that says something else cannot be placed, so the object is read from Stripe and what
Stripe says now is applied (Decision.reread; the read arrives as an authoritative
Change).

Mirrors paystream_subscription_transition_allowed() in
db/migrations/010_subscriptions.sql.
"""

from __future__ import annotations

from dataclasses import replace

from paystream.changes.machine import IGNORE, Change, Decision, State

STATUSES: tuple[str, ...] = ("incomplete", "incomplete_expired", "trialing", "active", "past_due",
                             "unpaid", "canceled", "paused")
# A subscription still running (active, past_due, ...) is news to its page; these end it.
FINAL: frozenset[str] = frozenset({"canceled", "incomplete_expired"})
# A renewal's payment failed: the subscription shows the invoice's error and next retry.
OVERDUE: frozenset[str] = frozenset({"past_due", "unpaid"})


def transition_allowed(old: str, new: str, declined: bool = False) -> bool:
    """Nothing leaves an end; `incomplete` is only ever a beginning, and only it can expire."""
    if old == new:
        return True
    if old in FINAL or new == "incomplete":
        return False
    if new == "incomplete_expired":
        return old == "incomplete"
    return True


def _carried(current: State, change: Change) -> Change:
    """A subscription's events carry no payment error and no retry time (the invoice's
    read brings them): an event that keeps an overdue status keeps both."""
    if change.authoritative or change.status != current.status or change.status not in OVERDUE:
        return change
    details = dict(change.details or {})
    details["next_payment_attempt"] = (current.details or {}).get("next_payment_attempt")
    return replace(change, last_error=current.last_error, details=details)


def decide(current: State, change: Change) -> Decision:
    if current.at is not None and change.at < current.at:
        return IGNORE  # delivered late: a newer event (or read) already set the state
    change = _carried(current, change)
    newer = current.at is None or change.at > current.at
    details = change.details if change.details is not None else current.details
    if (change.status, change.last_error, details) == (current.status, current.last_error, current.details):
        return Decision(touch=newer)
    if not newer and not change.authoritative:
        return Decision(reread=True)
    if not transition_allowed(current.status, change.status):
        return IGNORE
    return Decision((replace(change, details=details),))


class SubscriptionMachine:
    statuses = STATUSES
    final = FINAL

    def allowed(self, old: str, new: str, declined: bool) -> bool:
        return transition_allowed(old, new, declined)

    def decide(self, current: State, change: Change) -> Decision:
        return decide(current, change)


MACHINE = SubscriptionMachine()
