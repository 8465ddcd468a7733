"""The state machine: any delivery order of a transaction's events ends in one status."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from paystream.changes.lifecycle import (
    FINAL,
    RANK,
    STATUSES,
    Change,
    State,
    decide,
    transition_allowed,
)

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
DECLINE = {"code": "card_declined"}


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def fold(changes: list[Change], log: list[State] | None = None) -> State:
    """Apply changes in the given order exactly as the webhook handler does."""
    state: State | None = None
    for change in changes:
        if state is None:
            state = State(change.status, change.at, change.last_error)
            if log is not None:
                log.append(state)
            continue
        decision = decide(state, change)
        if decision.touch:
            state = State(state.status, max(state.at, change.at), state.last_error)
        for move in decision.moves:
            assert transition_allowed(state.status, move.status, move.declined), (state, move)
            state = State(move.status, max(state.at, move.at), move.last_error)
            if log is not None:
                log.append(state)
    assert state is not None
    return state


def test_ranks_never_go_down_except_a_decline_before_success() -> None:
    for old, new in itertools.product(STATUSES, STATUSES):
        if transition_allowed(old, new, declined=False) and old != new:
            assert RANK[new] > RANK[old] or (new == "canceled" and RANK[old] < 5), (old, new)
        if transition_allowed(old, new, declined=True) and RANK[new] < RANK[old]:
            assert new == "requires_payment_method" and RANK[old] < 5, (old, new)


def test_canceled_is_terminal_and_success_cannot_be_canceled() -> None:
    assert not any(transition_allowed("canceled", s, d) for s in STATUSES if s != "canceled" for d in (0, 1))
    for s in ("succeeded", "partially_refunded", "refunded", "disputed"):
        assert not transition_allowed(s, "canceled", False)
        assert not transition_allowed(s, "requires_payment_method", True)


STORIES = {
    "3ds then success": (
        [Change("requires_payment_method", at(0)), Change("requires_action", at(1)),
         Change("processing", at(2)), Change("succeeded", at(3))], "succeeded"),
    "decline then retry succeeds": (
        [Change("requires_payment_method", at(0)), Change("requires_action", at(1)),
         Change("requires_payment_method", at(2), DECLINE), Change("succeeded", at(3))], "succeeded"),
    "3ds fails": (
        [Change("requires_payment_method", at(0)), Change("requires_action", at(1)),
         Change("requires_payment_method", at(2), DECLINE)], "requires_payment_method"),
    "decline in the same second as the step before it": (
        [Change("requires_payment_method", at(0)), Change("requires_action", at(1)),
         Change("requires_payment_method", at(1), DECLINE)], "requires_payment_method"),
    "async payment fails": (
        [Change("processing", at(0)), Change("requires_payment_method", at(5), DECLINE)],
        "requires_payment_method"),
    "card validation canceled after capture hold": (
        [Change("requires_payment_method", at(0)), Change("requires_capture", at(1)),
         Change("canceled", at(2))], "canceled"),
    "refunded in two parts": (
        [Change("succeeded", at(0)), Change("partially_refunded", at(5)),
         Change("refunded", at(9))], "refunded"),
}


def test_every_permutation_of_each_story_ends_the_same() -> None:
    for name, (story, expected) in STORIES.items():
        finals = {fold(list(p)).status for p in itertools.permutations(story)}
        assert finals == {expected}, name


def test_a_decline_keeps_its_error_and_success_clears_it() -> None:
    story, _ = STORIES["3ds fails"]
    for p in itertools.permutations(story):
        assert fold(list(p)).last_error == DECLINE
    story, _ = STORIES["decline then retry succeeds"]
    for p in itertools.permutations(story):
        assert fold(list(p)).last_error is None


# A random walk over what Stripe can really send for one PaymentIntent, with
# non-decreasing whole-second timestamps (ties included, as Stripe's are).
_NEXT = {
    "requires_payment_method": ["requires_confirmation", "requires_action", "processing",
                                "requires_capture", "succeeded", "canceled"],
    "requires_confirmation": ["requires_action", "processing", "succeeded", "decline", "canceled"],
    "requires_action": ["processing", "requires_capture", "succeeded", "decline", "canceled"],
    "processing": ["succeeded", "requires_capture", "decline"],
    "requires_capture": ["succeeded", "canceled"],
    "succeeded": ["partially_refunded", "refunded", "disputed"],
    "partially_refunded": ["refunded", "disputed"],
    "refunded": [],
    "disputed": [],
    "canceled": [],
}


@st.composite
def stories(draw: st.DrawFn) -> list[Change]:
    status, t = "requires_payment_method", 0
    story = [Change(status, at(t))]
    for _ in range(draw(st.integers(1, 7))):
        options = _NEXT[status]
        if not options:
            break
        step = draw(st.sampled_from(options))
        t += draw(st.integers(0, 2))
        if step == "decline":
            status = "requires_payment_method"
            story.append(Change(status, at(t), {"code": f"declined_{t}"}))
        else:
            status = step
            story.append(Change(status, at(t)))
    return story


@settings(max_examples=300, deadline=None)
@given(stories(), st.randoms(use_true_random=False))
def test_random_stories_end_in_one_status_whatever_the_order(story: list[Change], rnd: random.Random) -> None:
    expected = fold(story).status
    for _ in range(20):
        shuffled = story[:]
        rnd.shuffle(shuffled)
        # duplicates too: Stripe retries
        shuffled += rnd.sample(story, k=min(2, len(story)))
        log: list[State] = []
        assert fold(shuffled, log).status == expected
        for before, after in itertools.pairwise(log):  # a step down is always a decline
            assert RANK[after.status] >= RANK[before.status] or after.last_error is not None


def test_final_statuses() -> None:
    assert FINAL == {"succeeded", "canceled", "refunded"}


def _dispute(status: str) -> dict:
    return {"id": "du_1", "amount": 500, "currency": "usd", "status": status}


def fold_disputes(changes: list[Change]) -> tuple[str, dict | None, int]:
    """Like fold, keeping the dispute; also counts the moves logged."""
    state = State("requires_payment_method", None)
    logged = 0
    for change in changes:
        for move in decide(state, change).moves:
            state = State(move.status, move.at, move.last_error, state.amount_refunded,
                          move.dispute if move.dispute is not None else state.dispute)
            logged += 1
    return state.status, state.dispute, logged


def test_every_order_of_a_disputed_payment_ends_disputed_with_the_latest_stage() -> None:
    story = [Change("processing", at(0)), Change("succeeded", at(1)),
             Change("disputed", at(5), dispute=_dispute("needs_response")),
             Change("disputed", at(6), dispute=_dispute("under_review")),
             Change("disputed", at(9), dispute=_dispute("won"))]
    ends = {(s, d["status"] if d else None) for s, d, _ in
            (fold_disputes(list(p)) for p in itertools.permutations(story))}
    assert ends == {("disputed", "won")}
    # In order: processing, succeeded, the chargeback, its closing (under_review is no news).
    assert fold_disputes(story)[2] == 4


def test_a_dispute_before_success_holds_and_success_arriving_late_changes_nothing() -> None:
    state = State("processing", at(0))
    [move] = decide(state, Change("disputed", at(5), dispute=_dispute("needs_response"))).moves
    assert move.status == "disputed"
    state = State("disputed", at(5), dispute=_dispute("needs_response"))
    assert decide(state, Change("succeeded", at(1))).moves == ()


def test_an_older_dispute_stage_delivered_late_is_ignored() -> None:
    won = State("disputed", at(9), dispute=_dispute("won"))
    assert decide(won, Change("disputed", at(5), dispute=_dispute("needs_response"))).moves == ()
    assert decide(won, Change("disputed", at(9), dispute=_dispute("won"))).moves == ()


def test_a_canceled_payment_cannot_be_disputed() -> None:
    assert decide(State("canceled", at(0)), Change("disputed", at(5), dispute=_dispute("needs_response"))).moves == ()
