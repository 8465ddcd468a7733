"""Test clients that talk to a running paystream exactly as Stripe and browsers do."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from paystream.auth import tokens
from paystream.dev import trigger

if TYPE_CHECKING:
    from tests.conftest import Server

FIXTURES = Path(__file__).parent / "fixtures" / "stripe"


def fixture_event(name: str, **overrides: Any) -> dict[str, Any]:
    """A real Stripe event body from tests/fixtures/stripe, with a fresh evt_ id
    (the fixtures' ids are zeroed, see SOURCES.md) and the given top-level overrides."""
    event = json.loads((FIXTURES / f"{name}.json").read_text())
    event["id"] = trigger.stripe_id("evt_")
    event.update(overrides)
    return event


@dataclass
class Frame:
    """One SSE frame as it came over the wire."""

    id: str | None = None
    event: str | None = None
    data: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def json(self) -> dict[str, Any]:
        assert self.data is not None
        return json.loads(self.data)


class SSE:
    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()
        self.closed = False

    async def frame(self, timeout: float = 10) -> Frame | None:
        """The next frame (comments included); None when the server ends the stream."""
        async with asyncio.timeout(timeout):
            frame = Frame()
            seen = False
            while True:
                try:
                    line = await anext(self._lines)
                except StopAsyncIteration:
                    self.closed = True
                    return frame if seen else None
                if line == "":
                    if seen:
                        return frame
                    continue
                seen = True
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "":
                    frame.comments.append(value)
                elif name == "id":
                    frame.id = value
                elif name == "event":
                    frame.event = value
                elif name == "data":
                    frame.data = value if frame.data is None else frame.data + "\n" + value
                elif name == "retry":
                    frame.retry = int(value)

    async def event(self, timeout: float = 10) -> Frame | None:
        """The next frame that is an event (skipping retry-only and ping frames)."""
        async with asyncio.timeout(timeout):  # one deadline: pings must not extend it
            while True:
                frame = await self.frame(timeout)
                if frame is None or frame.event is not None:
                    return frame

    async def rest(self, timeout: float = 10) -> list[Frame]:
        """Every event until the server closes the stream."""
        out = []
        while (frame := await self.event(timeout)) is not None:
            out.append(frame)
        return out


class Paystream:
    def __init__(self, server: Server) -> None:
        self.server = server
        # Room for many open streams beside the webhook posts (httpx's default pool is 100).
        self.http = httpx.AsyncClient(base_url=server.base_url, timeout=15,
                                      limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100,
                                                          # below the server's idle close (5 s; 2 s in test_deadlines): never
                                                          # reuse a connection the server may be closing
                                                          keepalive_expiry=1))

    async def __aenter__(self) -> Paystream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    # --- Stripe's side ---

    def event(self, event_type: str, pi_id: str, **kw: Any) -> dict[str, Any]:
        return trigger.build(event_type, pi_id, **kw)

    async def send(self, event: dict[str, Any] | None = None, *, body: str | bytes | None = None,
                   signature: str | None = None, secret: str | None = None,
                   timestamp: int | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
        if body is None:
            body = trigger.encode(event)
        if signature is None:
            signature = trigger.sign(body, secret or self.server.webhook_secret, timestamp)
        hdrs = {"Content-Type": "application/json", "Stripe-Signature": signature, **(headers or {})}
        if signature == "":
            del hdrs["Stripe-Signature"]
        return await self.http.post("/v1/stripe/webhook", content=body, headers=hdrs)

    async def deliver(self, event: dict[str, Any]) -> dict[str, Any]:
        resp = await self.send(event)
        assert resp.status_code == 200, resp.text
        return resp.json()

    # --- the merchant backend's side ---

    def token(self, *ids: str, cus: str | None = None, ttl: int = 3600,
              secret: str | None = None) -> str:
        return tokens.mint(secret or self.server.token_secret, txn=list(ids) or None, cus=cus,
                           ttl_seconds=ttl)[0]

    @property
    def backend(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.server.api_key}"}

    async def get(self, any_id: str, **params: Any) -> httpx.Response:
        return await self.http.get(f"/v1/transactions/{any_id}", params=params, headers=self.backend)

    # --- the browser's side ---

    @contextlib.asynccontextmanager
    async def sse(self, any_id: str, *, token: str | None = None,
                  last_event_id: int | None = None, params: dict[str, str] | None = None,
                  ) -> AsyncIterator[SSE]:
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        query = {"token": token or self.token(any_id), **(params or {})}
        async with self.http.stream("GET", f"/v1/transactions/{any_id}/events", params=query,
                                    headers=headers, timeout=httpx.Timeout(15, read=30)) as resp:
            yield SSE(resp)


async def statuses_until(stream: SSE, final: str, timeout: float = 20) -> list[dict[str, Any]]:
    """Every event the stream pushes up to and including the first at `final` (each
    awaited, at most `timeout` seconds apart); fails if the stream ends first."""
    seen = []
    while True:
        frame = await stream.event(timeout=timeout)
        assert frame is not None, f"stream ended before {final}: {seen}"
        seen.append(frame.json)
        if frame.json["status"] == final:
            return seen


async def wait_until(predicate, timeout: float = 10, what: str = "condition") -> Any:  # noqa: ANN001
    """Re-check an outside fact (database, /readyz) until true: for state this process
    cannot be told about, never as a stand-in for an event it can await."""
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def webhooks_held(emulator_url: str) -> AsyncIterator[None]:
    """The tests' emulator keeps every webhook until the block ends, then posts them
    (tests/stripe_emulator/hold.py): for acting before a webhook lands, without racing it."""
    async with httpx.AsyncClient(base_url=emulator_url, timeout=15,
                                 headers={"Authorization": "Bearer sk_test_paystream"}) as http:
        assert (await http.post("/_test/webhooks/hold")).status_code == 200
        try:
            yield
        finally:
            assert (await http.post("/_test/webhooks/release")).status_code == 200


class StripeJs:
    """What Stripe.js does in the customer's browser, done against localstripe."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, timeout=15,
                                      headers={"Authorization": "Bearer sk_test_paystream"})

    async def __aenter__(self) -> StripeJs:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def attach_card(self, pi: str, number: str) -> None:
        pm = await self.http.post("/v1/payment_methods", data={
            "type": "card", "card[number]": number, "card[exp_month]": "12",
            "card[exp_year]": "2030", "card[cvc]": "123"})
        assert pm.status_code == 200, pm.text
        # localstripe's confirm refuses a payment_method argument: set it on the PI first
        resp = await self.http.post(f"/v1/payment_intents/{pi}", data={"payment_method": pm.json()["id"]})
        assert resp.status_code == 200, resp.text

    async def pay(self, pi: str, number: str) -> httpx.Response:
        await self.attach_card(pi, number)
        return await self.http.post(f"/v1/payment_intents/{pi}/confirm")

    async def authenticate(self, pi: str, client_secret: str, success: bool = True) -> httpx.Response:
        return await self.http.post(f"/v1/payment_intents/{pi}/_authenticate",
                                    data={"client_secret": client_secret, "success": str(success).lower()})

    async def payment_intent(self, pi: str) -> dict[str, Any]:
        return (await self.http.get(f"/v1/payment_intents/{pi}")).json()

    async def customer(self) -> str:
        return (await self.http.post("/v1/customers", data={"email": "buyer@example.com"})).json()["id"]


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`paystream ARGS` as an operator runs it, from the checkout, with exactly `env`."""
    return subprocess.run([sys.executable, "-m", "paystream", *args], env=env,
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
