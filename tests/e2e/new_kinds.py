"""What the backfill, refresh and outbound tests of kinds subscription and checkout share:
an emulator of a test's own (tests/stripe_emulator, whose webhooks can be lost or sent to
one server only), and the customer's and the merchant's own calls to it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx

from paystream.dev.localstripe import LocalStripe
from paystream.ingest.backfill import _LOCK as BACKFILL_LOCK
from tests import harness, stripe_emulator
from tests.conftest import ARTIFACTS

VISA, DECLINED = "4242424242424242", "4000000000000341"
IBAN_OK = "DE89370400440532013000"
URLS = {"success_url": "https://shop.example/return?session_id={CHECKOUT_SESSION_ID}",
        "cancel_url": "https://shop.example/cart"}


@contextlib.contextmanager
def own_emulator(lost: bool) -> Iterator[LocalStripe]:
    """The tests' emulator, of this test alone; `lost`: its webhooks go to a closed port."""
    stripe = LocalStripe(harness.free_port(), ARTIFACTS, module=stripe_emulator.MODULE, cwd=harness.ROOT).start()
    try:
        if lost:
            stripe.register_webhook(f"http://127.0.0.1:{harness.free_port()}/v1/stripe/webhook", "whsec_lost")
        yield stripe
    finally:
        stripe.stop()


@contextlib.asynccontextmanager
async def no_backfill(db: asyncpg.Connection) -> AsyncIterator[None]:
    """Hold the lock every backfill takes (advisory locks are per database: only this
    run's processes wait on it), so that no server's backfill applies the events a test
    lost on purpose until it lets go."""
    await db.execute("SELECT pg_advisory_lock($1)", BACKFILL_LOCK)
    try:
        yield
    finally:
        await db.execute("SELECT pg_advisory_unlock($1)", BACKFILL_LOCK)


class Stripe:
    """Calls to the emulator: Stripe.js's on the customer's page, the hosted Checkout page
    (the emulator's test-only _complete), and the merchant's own code."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, timeout=15,
                                      headers={"Authorization": "Bearer sk_test_paystream"})

    async def __aenter__(self) -> Stripe:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def post(self, path: str, **data: Any) -> dict[str, Any]:
        resp = await self.http.post(path, data=data)
        assert resp.status_code == 200, resp.text
        return resp.json()

    async def customer(self) -> str:
        return (await self.post("/v1/customers", email="buyer@example.com"))["id"]

    async def monthly_price(self, amount: int = 1500) -> str:
        return (await self.post("/v1/prices", currency="usd", unit_amount=str(amount), **{
            "recurring[interval]": "month", "product_data[name]": "Monthly"}))["id"]

    async def card(self, number: str) -> str:
        return (await self.post("/v1/payment_methods", type="card", **{
            "card[number]": number, "card[exp_month]": "12", "card[exp_year]": "2030", "card[cvc]": "123"}))["id"]

    async def default_card(self, customer: str, number: str) -> None:
        pm = await self.card(number)
        await self.post(f"/v1/payment_methods/{pm}/attach", customer=customer)
        await self.post(f"/v1/customers/{customer}", **{"invoice_settings[default_payment_method]": pm})

    async def pay(self, pi: str, number: str) -> dict[str, Any]:
        """Stripe.js confirming a PaymentIntent with a card (localstripe's confirm refuses
        a payment_method argument: it is set on the PaymentIntent first)."""
        await self.post(f"/v1/payment_intents/{pi}", payment_method=await self.card(number))
        return await self.post(f"/v1/payment_intents/{pi}/confirm")

    async def complete(self, session: str, **how: str) -> dict[str, Any]:
        """The customer on Stripe's hosted page."""
        return await self.post(f"/v1/checkout/sessions/{session}/_complete", **how)

    async def events(self) -> list[dict[str, Any]]:
        """Every event the emulator lists (GET /v1/events, page by page)."""
        found: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = (await self.http.get("/v1/events", params=params)).json()
            found += page["data"]
            if not page["has_more"] or not page["data"]:
                return found
            params["starting_after"] = page["data"][-1]["id"]

    async def listed(self, *wanted: tuple[str, str, str | None]) -> bool:
        """Whether /v1/events lists, for each (type, object id, status or None), an event of
        that type about that object (in that status)."""
        have = {(e["type"], e["data"]["object"]["id"], e["data"]["object"].get("status")) for e in await self.events()}
        return all((t, i, s) in have if s is not None else any(h[:2] == (t, i) for h in have)
                   for t, i, s in wanted)
