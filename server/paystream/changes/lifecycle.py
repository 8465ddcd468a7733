"""Each kind's state machine, by kind: the payment machine (machine_payment.py) for
PaymentIntents, SetupIntents and invoices, the subscription machine
(machine_subscription.py) for subscriptions; both behind machine.Machine.

The database's transition check (db/migrations) dispatches on the kind the same way and
refuses anything the kind's machine would refuse, so a bug cannot corrupt a status.
Names the payment machine has always exported are re-exported here.
"""

from __future__ import annotations

from paystream.changes import machine_payment, machine_subscription
from paystream.changes.machine import (  # noqa: F401  # re-exported
    BEFORE_STRIPE,
    IGNORE,
    Change,
    Decision,
    Machine,
    State,
    stripe_now,
)
from paystream.changes.machine_payment import (  # noqa: F401  # re-exported
    DISPUTE_FUNDS_WITHDRAWN,
    FINAL,
    INFERRED_DECLINE,
    RANK,
    REFUNDABLE,
    STATUSES,
    SUCCEEDED_RANK,
    decide,
    dispute_stage,
    is_pre_success,
    transition_allowed,
)

# What a transaction is (the schema's transactions.kind CHECK lists the same).
KINDS: tuple[str, ...] = ("payment", "card_validation", "wallet_top_up", "invoice", "subscription",
                          "checkout")

MACHINES: dict[str, Machine] = {kind: machine_payment.MACHINE for kind in KINDS}
MACHINES["subscription"] = machine_subscription.MACHINE


def machine_for(kind: str) -> Machine:
    return MACHINES.get(kind, machine_payment.MACHINE)


# Every status of every kind, for validating what a client may ask for (?await=).
ALL_STATUSES: tuple[str, ...] = tuple(dict.fromkeys(s for m in (machine_payment.MACHINE, machine_subscription.MACHINE)
                                                    for s in m.statuses))

# FINAL (re-exported above) is the payment machine's.  Streams see a status, not a kind,
# so they end on any kind's final status: that is exact because kinds share a status only
# where they agree it is final (`canceled`), and no kind's running status is another's
# final one (tests/test_subscription_machine.py).
ENDS: frozenset[str] = frozenset().union(*(m.final for m in set(MACHINES.values())))
