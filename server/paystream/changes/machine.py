"""What every kind's state machine shares: the Change an event brings, the State a
transaction holds, the Decision a machine makes, and the Machine interface each kind's
file implements (machine_payment.py, machine_subscription.py; lifecycle.py picks one
by kind).  A machine is pure: no I/O, so every ordering rule is unit-tested."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

# The time of a status our own API sets before Stripe has said anything: earlier than
# any Stripe event, so none of them is mistaken for a late one.
BEFORE_STRIPE = datetime(1970, 1, 1, tzinfo=UTC)


def stripe_now() -> datetime:
    """Now, at Stripe's whole-second granularity, for changes paystream itself observes
    (a reconcile, a release): the same tie rules then apply as between Stripe's events."""
    return datetime.now(UTC).replace(microsecond=0)


@dataclass(frozen=True, slots=True)
class Change:
    """What one Stripe event (or one read of a Stripe object) says about a transaction."""

    status: str
    at: datetime  # the Stripe event's `created` (a read: when it was made)
    last_error: dict[str, Any] | None = None
    amount_refunded: int | None = None  # charge.refunded: the running total Stripe reports
    refund_error: dict[str, Any] | None = None  # refund.failed: the status stays, the error shows
    dispute: dict[str, Any] | None = None  # charge.dispute.*: {id, amount, currency, status}
    # The kind's own fields of the transaction JSON (a subscription's period end, an
    # invoice's subscription_id); None: this change says nothing about them.
    details: dict[str, Any] | None = None
    # Read from Stripe just now rather than carried by an event: what Stripe holds, so it
    # settles a tie between events of the same second.
    authoritative: bool = False
    # What Stripe took when it captured (a PaymentIntent's amount_received, a charge's
    # amount_captured): less than the amount after a partial capture (transitions.apply).
    amount_captured: int | None = None

    @property
    def declined(self) -> bool:
        return self.last_error is not None


@dataclass(frozen=True, slots=True)
class State:
    status: str
    at: datetime | None
    last_error: dict[str, Any] | None = None
    amount_refunded: int = 0
    dispute: dict[str, Any] | None = None
    details: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    moves: tuple[Change, ...] = ()  # status changes to log, in order
    touch: bool = False  # nothing visible changes, but the state is now this recent
    # The event cannot be placed (it ties with the state's time and says something else):
    # read the object from Stripe and apply what it says (changes/reads.py).
    reread: bool = False


IGNORE = Decision()


class Machine(Protocol):
    """One kind's lifecycle.  `allowed` is what the database's transition check enforces
    for the kind (db/migrations), so a bug in `decide` cannot store a forbidden step."""

    statuses: tuple[str, ...]
    final: frozenset[str]  # a browser waiting on one of these has its answer; streams end

    def allowed(self, old: str, new: str, declined: bool) -> bool: ...

    def decide(self, current: State, change: Change) -> Decision: ...
