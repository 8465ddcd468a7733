"""The coupon flow end to end (issue 24 section 7): POST /v1/transactions kind invoice
makes a one-off invoice at the emulator with the coupon as its discount, answers the
amount it adds to the wallet, the page pays it as Stripe.js would, and the paid invoice
credits the customer's wallet through the ledger exactly once, however its events are
duplicated or ordered; refusals come before anything is stored."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from paystream.dev import trigger
from paystream.dev.localstripe import LocalStripe
from tests.conftest import Server
from tests.support import Paystream, StripeJs, wait_until
from tests.support import statuses_until as until_status

pytestmark = pytest.mark.e2e

VISA, DECLINED = "4242424242424242", "4000000000000341"
ADD = 5000


@pytest.fixture
async def stripe_js(local_stripe: LocalStripe) -> AsyncIterator[StripeJs]:
    async with StripeJs(local_stripe.url) as js:
        yield js


async def coupon(js: StripeJs, **params: Any) -> str:
    resp = await js.http.post("/v1/coupons", data={"duration": "once", **{k: str(v) for k, v in params.items()}})
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


async def create(ps: Paystream, **body: Any) -> Any:
    return await ps.http.post("/v1/transactions", headers=ps.backend,
                              json={"kind": "invoice", "amount": ADD, "currency": "usd", **body})


async def groups(db: asyncpg.Connection, txn_id: str) -> dict[str, dict[str, int]]:
    rows = await db.fetch("SELECT entry_group, account, amount FROM ledger_entries WHERE transaction_id = $1"
                          " ORDER BY id", txn_id)
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        assert r["account"] not in out.setdefault(r["entry_group"], {})
        out[r["entry_group"]][r["account"]] = r["amount"]
    return out


async def wallet(db: asyncpg.Connection, customer: str) -> int:
    return await db.fetchval("SELECT coalesce(sum(amount), 0)::bigint FROM ledger_entries WHERE account = $1",
                             f"wallet:{customer}")


def ledger_check(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "paystream", "ledger", "--check", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "DATABASE_URL": server.database_url})


async def processed(db: asyncpg.Connection, invoice: str, *types: str) -> bool:
    """Every event of these types about the invoice is stored and processed."""
    rows = await db.fetch("SELECT DISTINCT type FROM stripe_events WHERE object_id = $1 AND processed_at IS NOT NULL",
                          invoice)
    return set(types) <= {r["type"] for r in rows}


async def test_a_coupon_invoice_paid_on_the_page_credits_the_amount_added_once(
        ps: Paystream, stripe_js: StripeJs, db: asyncpg.Connection, server: Server) -> None:
    customer, code = await stripe_js.customer(), await coupon(stripe_js, percent_off=20, name="Spring")
    resp = await create(ps, customer_id=customer, coupon=code, metadata={"order": "o-1"})
    assert resp.status_code == 201, resp.text
    created = resp.json()
    txn = created["transaction"]
    # The wallet gains the amount asked for; the customer pays it less the coupon.
    assert created["amount_added"] == ADD
    assert (txn["kind"], txn["status"], txn["amount"], txn["amount_added"]) == (
        "invoice", "requires_payment_method", 4000, ADD)
    assert txn["stripe_id"].startswith("in_") and txn["metadata"] == {"order": "o-1"}
    secret = created["client_secret"]
    assert secret and secret.startswith("pi_")
    invoice = (await stripe_js.http.get(f"/v1/invoices/{txn['stripe_id']}", params={"expand[0]": "discounts"})).json()
    assert (invoice["status"], invoice["subtotal"], invoice["amount_due"]) == ("open", ADD, 4000)
    assert [d["coupon"]["id"] for d in invoice["discounts"]] == [code]
    assert [d["amount"] for d in invoice["total_discount_amounts"]] == [1000]
    assert [line["amount"] for line in invoice["lines"]["data"]] == [ADD]
    assert invoice["metadata"]["transaction_id"] == txn["id"]

    pi = secret.split("_secret_")[0]
    async with ps.sse(txn["id"], token=created["stream_token"]) as stream:
        assert (await stream.event()).json["status"] == "requires_payment_method"
        paid = await stripe_js.pay(pi, VISA)
        assert paid.status_code == 200, paid.text
        pushed = (await until_status(stream, "succeeded"))[-1]
    assert pushed["balance"] == {"customer_id": customer, "amount": ADD, "currency": "usd"}
    await wait_until(lambda: processed(db, txn["stripe_id"], "invoice.paid", "invoice.payment_succeeded"), 20,
                     "the invoice's paid events, processed")
    credited = {f"topup:{txn['id']}": {f"wallet:{customer}": ADD, "stripe:clearing": -4000,
                                         "merchant:discounts": -1000}}
    assert await groups(db, txn["id"]) == credited
    assert await wallet(db, customer) == ADD

    # Stripe again: every event of the invoice and its payment, redelivered as is and
    # under new ids (the same facts told twice), shuffled: nothing more is posted.
    raws = await db.fetch("""SELECT raw_body FROM stripe_events
                              WHERE object_id = ANY($1::text[])""", [txn["stripe_id"], pi])
    events = [json.loads(r["raw_body"]) for r in raws]
    assert {e["type"] for e in events} >= {"invoice.paid", "invoice.payment_succeeded", "payment_intent.succeeded"}
    again = [*events, *({**e, "id": trigger.stripe_id("evt_")} for e in events)] * 2
    seed = random.randrange(1 << 30)
    print(f"delivery order seed: {seed}")
    random.Random(seed).shuffle(again)
    for event in again:
        await ps.deliver(event)
    assert await groups(db, txn["id"]) == credited
    assert await wallet(db, customer) == ADD
    assert (await ps.get(txn["id"])).json()["status"] == "succeeded"
    out = ledger_check(server, "--customer", customer)
    assert (out.returncode, out.stdout.strip()) == (0, '{"problems": 0}'), out.stdout + out.stderr


async def test_the_paid_invoices_events_in_any_order_and_twice_credit_once(
        ps: Paystream, stripe_js: StripeJs, db: asyncpg.Connection, server: Server) -> None:
    """The invoice is made at the emulator through paystream; its paid events are then
    delivered as Stripe could deliver them (any order, each twice, concurrently), built from
    the emulator's own objects rather than paid there, so that no delivery is in order."""
    customer, code = await stripe_js.customer(), await coupon(stripe_js, amount_off=1500, currency="usd")
    created = (await create(ps, customer_id=customer, coupon=code)).json()
    txn = created["transaction"]
    assert (txn["amount"], created["amount_added"]) == (ADD - 1500, ADD)
    invoice = (await stripe_js.http.get(f"/v1/invoices/{txn['stripe_id']}")).json()
    pi = (await stripe_js.payment_intent(created["client_secret"].split("_secret_")[0]))
    t = int(time.time()) - 30
    paid = {**invoice, "status": "paid", "amount_paid": invoice["amount_due"], "amount_remaining": 0}
    succeeded = {**pi, "status": "succeeded", "amount_received": pi["amount"]}
    events = [trigger.envelope("invoice.finalized", invoice, created=t),
              trigger.envelope("payment_intent.succeeded", succeeded, created=t + 1),
              trigger.envelope("invoice.paid", paid, created=t + 1),
              trigger.envelope("invoice.payment_succeeded", paid, created=t + 1)]
    deliveries = events * 2
    seed = random.randrange(1 << 30)
    print(f"delivery order seed: {seed}")
    random.Random(seed).shuffle(deliveries)
    await asyncio.gather(*(ps.deliver(e) for e in deliveries))
    assert (await ps.get(txn["id"])).json()["status"] == "succeeded"
    assert await groups(db, txn["id"]) == {f"topup:{txn['id']}": {
        f"wallet:{customer}": ADD, "stripe:clearing": -(ADD - 1500), "merchant:discounts": -1500}}
    out = ledger_check(server, "--transaction", txn["id"])
    assert (out.returncode, out.stdout.strip()) == (0, '{"problems": 0}'), out.stdout + out.stderr


async def test_without_a_coupon_the_wallet_gains_what_was_paid(
        ps: Paystream, stripe_js: StripeJs, db: asyncpg.Connection, server: Server) -> None:
    customer = await stripe_js.customer()
    created = (await create(ps, customer_id=customer)).json()
    assert (created["transaction"]["amount"], created["amount_added"]) == (ADD, ADD)
    txn = created["transaction"]
    async with ps.sse(txn["id"], token=created["stream_token"]) as stream:
        await stream.event()
        assert (await stripe_js.pay(created["client_secret"].split("_secret_")[0], VISA)).status_code == 200
        await until_status(stream, "succeeded")
    assert await groups(db, txn["id"]) == {f"topup:{txn['id']}": {f"wallet:{customer}": ADD,
                                                                   "stripe:clearing": -ADD}}
    out = ledger_check(server, "--transaction", txn["id"])
    assert (out.returncode, out.stdout.strip()) == (0, '{"problems": 0}'), out.stdout + out.stderr


async def test_a_coupon_that_covers_it_all_is_paid_at_once(
        ps: Paystream, stripe_js: StripeJs, db: asyncpg.Connection, server: Server) -> None:
    """Nothing due: Stripe marks the invoice paid as it finalises it, there is nothing for
    the page to pay, and the whole credit comes from the discount."""
    customer, code = await stripe_js.customer(), await coupon(stripe_js, percent_off=100)
    resp = await create(ps, customer_id=customer, coupon=code)
    assert resp.status_code == 201, resp.text
    created = resp.json()
    txn = created["transaction"]
    assert (txn["status"], txn["amount"], created["amount_added"], created["client_secret"]) == (
        "succeeded", 0, ADD, None)
    await wait_until(lambda: processed(db, txn["stripe_id"], "invoice.paid", "invoice.payment_succeeded"), 20,
                     "the invoice's paid events, processed")
    assert await groups(db, txn["id"]) == {f"topup:{txn['id']}": {f"wallet:{customer}": ADD,
                                                                   "merchant:discounts": -ADD}}
    out = ledger_check(server, "--transaction", txn["id"])
    assert (out.returncode, out.stdout.strip()) == (0, '{"problems": 0}'), out.stdout + out.stderr


async def test_refunds_take_back_the_share_of_the_credit_they_paid_for(
        ps: Paystream, stripe_js: StripeJs, db: asyncpg.Connection, server: Server) -> None:
    customer, code = await stripe_js.customer(), await coupon(stripe_js, percent_off=20)
    created = (await create(ps, customer_id=customer, coupon=code)).json()
    txn, pi = created["transaction"], created["client_secret"].split("_secret_")[0]
    async with ps.sse(txn["id"], token=created["stream_token"]) as stream:
        await stream.event()
        assert (await stripe_js.pay(pi, VISA)).status_code == 200
        await until_status(stream, "succeeded")
    # A quarter of the price through paystream, then the rest; Stripe's report of the
    # whole refund, delivered twice afterwards, takes nothing more.
    headers = ps.backend
    first = await ps.http.post(f"/v1/transactions/{txn['id']}/refunds", headers=headers, json={"amount": 1000})
    assert first.status_code == 201, first.text
    rest = await ps.http.post(f"/v1/transactions/{txn['id']}/refunds", headers=headers, json={})
    assert rest.status_code == 201, rest.text
    assert (rest.json()["transaction"]["status"], rest.json()["transaction"]["amount_refunded"]) == ("refunded", 4000)
    report = trigger.build("charge.refunded", pi, amount=4000, amount_refunded=4000, created=int(time.time()))
    for event in (report, report, {**report, "id": trigger.stripe_id("evt_")}):
        await ps.deliver(event)
    posted = await groups(db, txn["id"])
    assert posted[f"refund:{txn['id']}:1000"] == {f"wallet:{customer}": -1250, "stripe:clearing": 1000,
                                                   "merchant:discounts": 250}
    assert posted[f"refund:{txn['id']}:4000"] == {f"wallet:{customer}": -3750, "stripe:clearing": 3000,
                                                   "merchant:discounts": 750}
    assert len(posted) == 3 and await wallet(db, customer) == 0
    out = ledger_check(server, "--transaction", txn["id"])
    assert (out.returncode, out.stdout.strip()) == (0, '{"problems": 0}'), out.stdout + out.stderr


async def test_a_declined_card_credits_nothing(ps: Paystream, stripe_js: StripeJs, db: asyncpg.Connection,
                                              server: Server) -> None:
    customer, code = await stripe_js.customer(), await coupon(stripe_js, percent_off=20)
    created = (await create(ps, customer_id=customer, coupon=code)).json()
    txn = created["transaction"]
    async with ps.sse(txn["id"], token=created["stream_token"]) as stream:
        await stream.event()
        declined = await stripe_js.pay(created["client_secret"].split("_secret_")[0], DECLINED)
        assert declined.status_code == 402, declined.text
        failed = await stream.event(timeout=20)
    assert failed is not None and failed.json["status"] == "requires_payment_method"
    assert failed.json["last_error"] is not None
    await wait_until(lambda: processed(db, txn["stripe_id"], "invoice.payment_failed"), 20,
                     "the invoice's payment_failed, processed")
    assert await groups(db, txn["id"]) == {} and await wallet(db, customer) == 0
    out = ledger_check(server, "--transaction", txn["id"])
    assert (out.returncode, out.stdout.strip()) == (0, '{"problems": 0}'), out.stdout + out.stderr


async def test_one_idempotency_key_is_one_invoice(ps: Paystream, stripe_js: StripeJs, db: asyncpg.Connection) -> None:
    customer, code = await stripe_js.customer(), await coupon(stripe_js, percent_off=20)
    body = {"kind": "invoice", "amount": ADD, "customer_id": customer, "coupon": code}
    headers = {**ps.backend, "Idempotency-Key": f"coupon-{customer}"}
    answers = await asyncio.gather(*(ps.http.post("/v1/transactions", headers=headers, json=body) for _ in range(3)))
    assert [a.status_code for a in answers] == [201] * 3, [a.text for a in answers]
    assert len({json.dumps(a.json(), sort_keys=True) for a in answers}) == 1
    assert answers[0].json()["amount_added"] == ADD
    assert await db.fetchval("SELECT count(*) FROM transactions WHERE customer_id = $1", customer) == 1
    invoices = (await stripe_js.http.get("/v1/invoices", params={"customer": customer})).json()["data"]
    assert [i["id"] for i in invoices] == [answers[0].json()["transaction"]["stripe_id"]]
    coupon_now = (await stripe_js.http.get(f"/v1/coupons/{code}")).json()
    assert coupon_now["times_redeemed"] == 1


@pytest.mark.parametrize("case", ["unknown_coupon", "unknown_customer", "other_currency", "used_up", "no_customer"])
async def test_refusals_come_before_anything_is_stored(
        case: str, ps: Paystream, stripe_js: StripeJs, db: asyncpg.Connection) -> None:
    customer = await stripe_js.customer()
    body: dict[str, Any] = {"customer_id": customer}
    expected = (400, case)
    if case == "unknown_coupon":
        body["coupon"] = "NO-SUCH-COUPON"
    elif case == "unknown_customer":
        body["customer_id"] = "cus_nobody00000000"
    elif case == "other_currency":
        body["coupon"] = await coupon(stripe_js, amount_off=500, currency="eur")
        expected = (400, "coupon_not_applicable")
    elif case == "used_up":
        body["coupon"] = await coupon(stripe_js, percent_off=10, max_redemptions=1)
        first = await create(ps, customer_id=await stripe_js.customer(), coupon=body["coupon"])
        assert first.status_code == 201, first.text
        expected = (400, "coupon_expired")
    else:
        del body["customer_id"]
        expected = (400, "bad_request")
    resp = await create(ps, **body)
    assert (resp.status_code, resp.json()["error"]["code"]) == expected, resp.text
    asked = body.get("customer_id", customer)
    assert await db.fetchval("SELECT count(*) FROM transactions WHERE customer_id = $1", asked) == 0
    if case != "unknown_customer":
        listed = (await stripe_js.http.get("/v1/invoices", params={"customer": asked})).json()
        assert listed["data"] == []
