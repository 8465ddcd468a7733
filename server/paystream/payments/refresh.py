"""POST /v1/transactions/{id}/refresh: read the transaction's Stripe object now and apply
its state like a webhook (same state machine, same exactly-once effects), pushed with
cause.type = "paystream.refresh".  The page a customer lands on after confirming (or
after a 3-D Secure redirect) learns the outcome without waiting 1-5 s for the webhook;
the webhook that arrives later is then old news and changes nothing.

Browsers call it, so it is bounded twice: one Stripe read per transaction per
REFRESH_EVERY seconds, and PAYSTREAM_REFRESH_RATE reads per second per process in all,
so that no page can spend the account's Stripe rate limit; beyond either, 429 with
Retry-After."""

from __future__ import annotations

import math
import time
from collections import OrderedDict

from starlette.requests import Request
from starlette.responses import JSONResponse

from paystream.auth import access
from paystream.changes import store, transitions
from paystream.changes.lifecycle import stripe_now
from paystream.db import ACQUIRE_TIMEOUT
from paystream.errors import ApiError
from paystream.payments.current import change_from_object
from paystream.payments.stripe_api import StripeApi, StripeFailure
from paystream.push.streams import read_covered

REFRESH_EVERY = 2.0
_REMEMBERED = 100_000  # transactions whose last read is kept (older ones are past REFRESH_EVERY)


class RefreshLimits:
    """A token bucket for the process, and the last read of each transaction."""

    def __init__(self, rate: float, every: float = REFRESH_EVERY) -> None:
        self.rate, self.every = rate, every
        self._tokens = rate
        self._at = time.monotonic()
        self._last: OrderedDict[str, float] = OrderedDict()

    def take(self, txn_id: str) -> None:
        """Allow one read of txn_id now, or raise 429 saying when to come back."""
        now = time.monotonic()
        last = self._last.get(txn_id)
        if last is not None and now - last < self.every:
            raise _too_many(self.every - (now - last), "this transaction was refreshed moments ago")
        self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            raise _too_many((1 - self._tokens) / self.rate, "refreshes are rate-limited on this server")
        self._tokens -= 1
        self._last[txn_id] = now
        self._last.move_to_end(txn_id)
        while len(self._last) > _REMEMBERED:
            self._last.popitem(last=False)


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
    state.refresh_limits.take(row["id"])
    try:
        obj = await api.retrieve(row["stripe_id"])
    except StripeFailure as failure:
        raise ApiError(502, failure.code, failure.message) from None
    change = change_from_object(obj, stripe_now())
    changed = False
    if change is not None:
        async with state.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
            locked = await store.lock_by_id(conn, row["id"])
            changed, row = await transitions.apply(conn, locked, change, stripe_event_id=None,
                                                   cause_type="paystream.refresh")
    return JSONResponse({"transaction": store.render(row), "changed": changed})
