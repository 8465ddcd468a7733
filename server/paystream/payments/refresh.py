"""POST /v1/transactions/{id}/refresh: read the transaction's Stripe object now and apply
its state like a webhook (same state machine, same exactly-once effects), pushed with
cause.type = "paystream.refresh".  The page a customer lands on after confirming (or
after a 3-D Secure redirect) learns the outcome without waiting 1-5 s for the webhook;
the webhook that arrives later is then old news and changes nothing.

Browsers call it, so it is bounded: per transaction, two reads in a row, then one per
REFRESH_EVERY seconds (the page refreshes at Pay and again when the customer approves 3-D
Secure, often within a second or two: refusing that second read left the page waiting
for the webhook); per caller, a share of PAYSTREAM_REFRESH_RATE for each stream token and a larger
one for each client address, so that one caller cannot spend what other customers'
refreshes need; and PAYSTREAM_REFRESH_RATE reads per second per process in all, so that
no set of pages can spend the account's Stripe rate limit.  Beyond any of them, 429 with
Retry-After, and a refused refresh counts against none of them."""

from __future__ import annotations

import math
import time
from collections import OrderedDict

from starlette.requests import Request
from starlette.responses import JSONResponse

from paystream.auth import access
from paystream.changes import store
from paystream.changes.lifecycle import stripe_now
from paystream.db import ACQUIRE_TIMEOUT
from paystream.errors import ApiError
from paystream.payments.current import apply_read, read
from paystream.payments.stripe_api import StripeApi, StripeFailure
from paystream.push.streams import read_covered

REFRESH_EVERY = 2.0
REFRESH_BURST = 2  # reads of one transaction in a row before REFRESH_EVERY applies
_REMEMBERED = 100_000  # transactions, tokens and addresses whose last reads are kept
# A caller's share of PAYSTREAM_REFRESH_RATE (20 a second by default): a token may burst 4
# reads and go on at 1 a second (a page refreshes at Pay and after 3-D Secure, a customer
# token's page a few more); an address, where several customers may sit behind one NAT,
# bursts 10 and goes on at 5 a second.  Each below the whole, so no one caller empties it.
TOKEN_SHARE = (1 / 5, 1 / 20)    # (burst, per second) as fractions of the rate
ADDRESS_SHARE = (1 / 2, 1 / 4)


class Buckets:
    """Token buckets by key, each `burst` deep and refilled at `rate` a second.  Only the
    most recently used _REMEMBERED keys are kept: a forgotten key comes back full, which
    the process-wide bucket still bounds."""

    def __init__(self, burst: float, rate: float) -> None:
        self.burst, self.rate = max(1.0, burst), rate
        self._level: OrderedDict[object, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def wait(self, key: object, now: float) -> float:
        """Seconds until `key` may take one (0: now)."""
        return max(0.0, (1 - self._now(key, now)) / self.rate)

    def take(self, key: object, now: float) -> None:
        self._level[key] = (self._now(key, now) - 1, now)
        self._level.move_to_end(key)
        while len(self._level) > _REMEMBERED:
            self._level.popitem(last=False)

    def _now(self, key: object, now: float) -> float:
        tokens, at = self._level.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)


class RefreshLimits:
    """A bucket per transaction, per token and per client address, and one for the
    process (PAYSTREAM_REFRESH_RATE)."""

    def __init__(self, rate: float, every: float = REFRESH_EVERY) -> None:
        self.rate, self.every = rate, every
        self._transactions = Buckets(REFRESH_BURST, 1 / every)
        self._tokens = Buckets(rate * TOKEN_SHARE[0], rate * TOKEN_SHARE[1])
        self._addresses = Buckets(rate * ADDRESS_SHARE[0], rate * ADDRESS_SHARE[1])
        self._process = Buckets(rate, rate)

    def take(self, txn_id: str, token: bytes | None = None, address: str | None = None) -> None:
        """Allow one read of txn_id now for this caller (`token`: Grant.key, None for the
        API key, which is one trusted caller and limited only in all), or raise 429
        saying when to come back.  Every bound is checked before any is counted: a refused
        refresh costs the caller nothing, and each caller is refused by its own bounds
        before it can reach the process's."""
        now = time.monotonic()
        wait = self._transactions.wait(txn_id, now)
        if wait > 0:
            raise _too_many(wait, "this transaction was refreshed moments ago")
        checks = [(self._process, None, "refreshes are rate-limited on this server")]
        if address is not None:
            checks.insert(0, (self._addresses, address, "refreshes from this address are rate-limited"))
        if token:
            checks.insert(0, (self._tokens, token, "refreshes with this token are rate-limited"))
        waits = [(buckets.wait(key, now), message) for buckets, key, message in checks]
        refused = [(wait, message) for wait, message in waits if wait > 0]
        if refused:
            raise _too_many(max(wait for wait, _ in refused), refused[0][1])
        for buckets, key, _message in checks:
            buckets.take(key, now)
        self._transactions.take(txn_id, now)


def _too_many(wait: float, message: str) -> ApiError:
    seconds = max(1, math.ceil(wait))
    return ApiError(429, "too_many_requests", f"{message}; retry after {seconds} s",
                    headers={"Retry-After": str(seconds)})


async def refresh(request: Request) -> JSONResponse:
    grant = access.reader(request)
    state = request.app.state
    api: StripeApi | None = state.stripe
    if api is None:
        raise ApiError(503, "stripe_not_configured", "STRIPE_API_KEY is not set on this server")
    row = await read_covered(state.pool, grant, request.path_params["id"])
    if not row["stripe_id"]:
        raise ApiError(409, "not_linked", "this transaction has no Stripe object yet")
    if grant.backend:
        state.refresh_limits.take(row["id"])
    else:
        state.refresh_limits.take(row["id"], grant.key, access.address(request))
    try:
        now = await read(api, state.pool, row["stripe_id"], stripe_now())
    except StripeFailure as failure:
        raise ApiError(503 if failure.status == 503 else 502, failure.code, failure.message,
                       failure.headers) from None
    changed = False
    if now.change is not None or now.follows:
        async with state.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
            locked = await store.lock_by_id(conn, row["id"])
            changed, row = await apply_read(conn, locked, now, "paystream.refresh")
    return JSONResponse({"transaction": store.render(row), "changed": changed})
