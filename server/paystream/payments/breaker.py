"""What stands between paystream and Stripe: a circuit breaker and a call budget, one of
each per process, shared by every call (create, refresh, refunds, the sweeper, backfill).

When Stripe is down or hangs, every call used to wait its full timeout (and stripe-python's
retries) before failing: a pile of requests each holding a connection for half a minute.
The breaker opens after `failures` consecutive connection failures, timeouts or 5xx, and
from then on calls fail at once (`503 stripe_unavailable` with `Retry-After`) until
`open_seconds` have passed; then one call goes through as a probe (half-open), and its
answer closes the breaker or opens it again.  Any answer from Stripe, a 4xx included,
means Stripe is up.

The budget is a token bucket (`rate` calls a second, bursts up to one second's worth),
below Stripe's documented per-endpoint limit so that our own sweeps and backfills never
earn us 429s; a call waits for a token up to `max_wait`, then is refused the same way.  A
429 that gets through anyway (Stripe's limits are per account, not per process) empties
the bucket for the time Stripe asked for.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from paystream.ops import metrics

log = logging.getLogger("paystream.stripe_api")

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
_STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class Refused(Exception):
    """A call not made: the breaker is open (or a probe is out), or the budget is spent."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = max(1, math.ceil(retry_after))


class Breaker:
    def __init__(self, failures: int = 5, open_seconds: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failures, self.open_seconds, self.clock = failures, open_seconds, clock
        self.state = CLOSED
        self.failed = 0  # consecutive failures while closed
        self.opened_at = 0.0
        self.probing = False
        metrics.STRIPE_BREAKER.set(_STATE_VALUE[CLOSED])

    def retry_after(self) -> float:
        return max(0.0, self.opened_at + self.open_seconds - self.clock())

    def before_call(self) -> bool:
        """Raise Refused unless a call may go to Stripe now; True if it is the probe."""
        if self.state == CLOSED:
            return False
        if self.state == OPEN and self.retry_after() > 0:
            raise Refused("Stripe is unavailable (circuit breaker open)", self.retry_after())
        if self.probing:
            raise Refused("Stripe is unavailable (a probe call is checking it)", 1)
        self._move(HALF_OPEN, "probing Stripe with one call")
        self.probing = True
        return True

    def succeeded(self, probe: bool) -> None:
        if probe:
            self.probing = False
        self.failed = 0
        if self.state != CLOSED:
            self._move(CLOSED, "Stripe answered")

    def failed_call(self, probe: bool, why: str) -> None:
        if probe:
            self.probing = False
        if self.state == HALF_OPEN:
            self._open(f"the probe failed: {why}")
            return
        self.failed += 1
        if self.state == CLOSED and self.failed >= self.failures:
            self._open(f"{self.failed} calls in a row failed, the last: {why}")

    def abandoned(self, probe: bool) -> None:
        """The call was cancelled before Stripe answered: it proves nothing either way."""
        if probe:
            self.probing = False
            if self.state == HALF_OPEN:
                self.state = OPEN  # the next call probes again, without waiting
                self.opened_at = self.clock() - self.open_seconds

    def _open(self, why: str) -> None:
        self.opened_at = self.clock()
        self._move(OPEN, f"{why}; calls fail at once for {self.open_seconds:g} s")

    def _move(self, state: str, why: str) -> None:
        if state == self.state:
            return
        (log.warning if state == OPEN else log.info)("Stripe circuit breaker %s -> %s: %s", self.state, state, why)
        self.state = state
        metrics.STRIPE_BREAKER.set(_STATE_VALUE[state])
        metrics.STRIPE_BREAKER_CHANGES.labels(state).inc()


class Budget:
    """A token bucket: `rate` tokens a second, at most `rate` (one second's) held."""

    def __init__(self, rate: float = 80.0, max_wait: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.max_wait, self.clock = rate, max_wait, clock
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.at = clock()
        self.paused_until = 0.0

    def _refill(self) -> None:
        now = self.clock()
        if now < self.paused_until:
            self.at = now
            return
        start = max(self.at, self.paused_until)
        self.tokens = min(self.capacity, self.tokens + (now - start) * self.rate)
        self.at = now

    def wait_for_token(self) -> float:
        """Take a token: 0 if one was free, else the seconds to wait for the one now
        reserved (the caller sleeps that long); Refused if that is beyond max_wait."""
        self._refill()
        now = self.clock()
        wait = max(0.0, self.paused_until - now) + max(0.0, (1 - self.tokens) / self.rate)
        if wait > self.max_wait:
            raise Refused("paystream's budget of calls to Stripe is spent for now", wait)
        self.tokens -= 1  # may go below zero: the reservation of a caller who waits
        return wait

    async def take(self) -> None:
        wait = self.wait_for_token()
        if wait > 0:
            await asyncio.sleep(wait)  # the budget's own pacing, not a synchronisation

    def pause(self, seconds: float) -> None:
        """Stripe said 429: no calls for `seconds`, and none saved up meanwhile."""
        self.paused_until = max(self.paused_until, self.clock() + seconds)
        self.tokens = min(self.tokens, 0.0)
        metrics.STRIPE_RATE_LIMITED.inc()
