"""Stripe behind a circuit breaker (issue 24, section 4): the emulator stopped mid-run,
then hanging (a listener that accepts and never answers), then back. Calls fail fast
while it is away, nothing is written for a call not made, webhooks and /readyz carry on,
and a probe closes the breaker when Stripe answers again."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import Iterator

import asyncpg
import httpx
import pytest

from paystream.dev import trigger
from paystream.dev.localstripe import LocalStripe
from tests.conftest import ARTIFACTS, Server
from tests.harness import free_port
from tests.support import Paystream, StripeJs, wait_until

pytestmark = pytest.mark.e2e

FAST = 0.9  # a refused call is answered well within this; a real attempt takes >= 1 s here
# This run's creates, told apart from other tests' rows in the shared database.
MARK = secrets.token_hex(6)


class Upstream:
    """Port P as Stripe: the emulator, nothing (connection refused), or a black hole."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stripe: LocalStripe | None = None
        self.hole: socket.socket | None = None

    def emulator(self) -> None:
        self.close_hole()
        self.stripe = LocalStripe(self.port, ARTIFACTS).start()

    def stop(self) -> None:
        if self.stripe is not None:
            self.stripe.stop()
            self.stripe = None

    def black_hole(self) -> None:
        """Listens (the kernel completes the handshake) but never accepts: every request hangs."""
        self.stop()
        self.hole = socket.socket()
        self.hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.hole.bind(("127.0.0.1", self.port))
        self.hole.listen(128)

    def close_hole(self) -> None:
        if self.hole is not None:
            self.hole.close()
            self.hole = None


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    up = Upstream()
    up.emulator()
    yield up
    up.stop()
    up.close_hole()


async def create(ps: Paystream) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    resp = await ps.http.post("/v1/transactions", headers=ps.backend,
                              json={"kind": "payment", "amount": 1500, "currency": "usd",
                                    "metadata": {"breaker_test": MARK}})
    return resp, time.monotonic() - started


def breaker_state(metrics: str) -> float:
    return next(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("paystream_stripe_breaker_state "))


async def test_calls_fail_fast_while_stripe_is_away_and_resume_when_it_is_back(
        database_url: str, db: asyncpg.Connection, upstream: Upstream) -> None:
    server = Server(database_url, {"STRIPE_API_BASE": upstream.url, "PAYSTREAM_STRIPE_TIMEOUT": "1",
                                   "PAYSTREAM_STRIPE_BREAKER_FAILURES": "2",
                                   "PAYSTREAM_STRIPE_BREAKER_SECONDS": "3"})
    await asyncio.to_thread(server.start)
    try:
        async with Paystream(server) as ps:
            ok, _ = await create(ps)
            assert ok.status_code == 201, ok.text

            # Stopped: two real attempts fail (connection refused), then the breaker is open.
            await asyncio.to_thread(upstream.stop)
            for _ in range(2):
                failed, took = await create(ps)
                assert failed.status_code == 502 and failed.json()["error"]["code"] == "stripe_unavailable"
            assert breaker_state((await ps.http.get("/metrics")).text) == 2.0
            mine = "SELECT count(*) FROM transactions WHERE metadata->>'breaker_test' = $1"
            txns = await db.fetchval(mine, MARK)
            refused, took = await create(ps)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "stripe_unavailable"
            assert 1 <= int(refused.headers["retry-after"]) <= 3
            assert took < FAST, took
            assert await db.fetchval(mine, MARK) == txns  # nothing written for it

            # Stripe down is not paystream down: ready, and webhooks still apply.
            assert (await ps.http.get("/readyz")).status_code == 200
            pi = trigger.stripe_id("pi_")
            assert (await ps.deliver(ps.event("payment_intent.succeeded", pi)))["outcome"] == "applied"

            # Hanging: once the open period is over, one probe waits out its timeouts and
            # fails; the breaker opens again and the next call is refused at once.
            await asyncio.to_thread(upstream.black_hole)

            async def probed() -> bool:
                resp, took = await create(ps)
                return resp.status_code == 502 and took >= 1  # a real attempt, timed out
            await wait_until(probed, timeout=30, what="the half-open probe into the black hole")
            refused, took = await create(ps)
            assert refused.status_code == 503 and took < FAST, (refused.text, took)

            # Back: a probe succeeds and the breaker closes.
            await asyncio.to_thread(upstream.emulator)

            async def created() -> bool:
                resp, _ = await create(ps)
                return resp.status_code == 201
            await wait_until(created, timeout=30, what="a create once Stripe is back")
            assert breaker_state((await ps.http.get("/metrics")).text) == 0.0
            async with StripeJs(upstream.url) as stripe_js:
                assert await stripe_js.customer()  # the emulator really is back
        log = server.log_path.read_text()
        assert "Stripe circuit breaker closed -> open" in log
        assert "Stripe circuit breaker half_open -> closed" in log
    finally:
        server.stop()
