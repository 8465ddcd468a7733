"""The breaker and the budget in front of Stripe (paystream.payments.breaker), on a clock
the test moves."""

from __future__ import annotations

import pytest

from paystream.payments.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, Budget, Refused


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_after_consecutive_failures_and_a_probe_closes_it() -> None:
    clock = Clock()
    breaker = Breaker(failures=3, open_seconds=30, clock=clock)
    for _ in range(2):
        breaker.failed_call(breaker.before_call(), "connection refused")
    breaker.succeeded(breaker.before_call())  # an answer resets the count
    for _ in range(3):
        breaker.failed_call(breaker.before_call(), "timeout")
    assert breaker.state == OPEN
    with pytest.raises(Refused) as refused:
        breaker.before_call()
    assert refused.value.retry_after == 30
    clock.now += 29.5
    with pytest.raises(Refused):
        breaker.before_call()
    clock.now += 1
    assert breaker.before_call() is True and breaker.state == HALF_OPEN  # the probe
    with pytest.raises(Refused):
        breaker.before_call()  # one probe at a time
    breaker.succeeded(True)
    assert breaker.state == CLOSED and breaker.before_call() is False


def test_a_failed_probe_opens_it_again_and_an_abandoned_one_lets_the_next_probe() -> None:
    clock = Clock()
    breaker = Breaker(failures=1, open_seconds=10, clock=clock)
    breaker.failed_call(breaker.before_call(), "500")
    clock.now += 10
    breaker.failed_call(breaker.before_call(), "still 500")
    assert breaker.state == OPEN and breaker.retry_after() == 10
    clock.now += 10
    breaker.abandoned(breaker.before_call())  # the caller went away mid-probe
    assert breaker.before_call() is True  # the next call probes at once


def test_the_budget_paces_calls_and_refuses_beyond_its_wait() -> None:
    clock = Clock()
    budget = Budget(rate=10, max_wait=0.5, clock=clock)
    assert [budget.wait_for_token() for _ in range(10)] == [0.0] * 10  # a second's burst
    assert budget.wait_for_token() == pytest.approx(0.1)
    assert budget.wait_for_token() == pytest.approx(0.2)
    for _ in range(3):
        budget.wait_for_token()
    with pytest.raises(Refused):
        budget.wait_for_token()  # 0.6 s away: beyond max_wait
    clock.now += 1.0
    assert budget.wait_for_token() == 0.0


def test_a_429_pauses_the_budget_for_what_stripe_asked() -> None:
    clock = Clock()
    budget = Budget(rate=10, max_wait=5, clock=clock)
    budget.pause(2)
    assert budget.wait_for_token() == pytest.approx(2.1)
    clock.now += 3
    assert budget.wait_for_token() == pytest.approx(0.0, abs=1e-9)
