"""The money of a Checkout Session, in the ledger once: the session (kind checkout) and
the PaymentIntent it made (kind payment, a transaction of its own that the session
follows) are two transactions for one purchase, so only one of them may post it."""

from __future__ import annotations

import asyncpg
import pytest

from paystream.dev.localstripe import LocalStripe
from tests.e2e.new_kinds import URLS, VISA, Stripe
from tests.support import Paystream, wait_until

pytestmark = pytest.mark.e2e


@pytest.mark.xfail(strict=True, reason="effects/ledger.py posts capture:<session> and capture:<its PaymentIntent>: "
                   "a checkout purchase is merchant revenue twice (found by the issue 23 backfill coverage; reported "
                   "to the ledger's owner, whose file had uncommitted work)")
async def test_a_paid_session_is_revenue_once(ps: Paystream, local_stripe: LocalStripe,
                                              db: asyncpg.Connection) -> None:
    resp = await ps.http.post("/v1/transactions", headers=ps.backend, json={
        "kind": "checkout", "mode": "payment", "amount": 2600, "currency": "usd", **URLS})
    assert resp.status_code == 201, resp.text
    session = resp.json()["transaction"]
    async with Stripe(local_stripe.url) as stripe:
        pi = (await stripe.complete(session["stripe_id"], card=VISA))["payment_intent"]

    async def both_succeeded() -> list[str] | None:
        rows = await db.fetch("SELECT id FROM transactions WHERE stripe_id = ANY($1) AND status = 'succeeded'",
                              [session["stripe_id"], pi])
        return [r["id"] for r in rows] if len(rows) == 2 else None

    purchase = await wait_until(both_succeeded, timeout=20, what="the session and its PaymentIntent succeeded")
    revenue = await db.fetchval("SELECT coalesce(sum(amount), 0) FROM ledger_entries WHERE transaction_id = ANY($1)"
                                " AND account = 'merchant:revenue'", purchase)
    assert revenue == 2600
