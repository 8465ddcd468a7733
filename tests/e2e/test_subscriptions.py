"""Subscriptions end to end: stripe-python -> the emulator (tests/stripe_emulator) ->
signed webhooks -> paystream -> SSE.  A customer with a default card is active at once;
one without confirms the first invoice's payment on the page (3-D Secure too); a failed
renewal is past_due with the invoice's error, its paid retry active again; cancel now or
at period end; a tie between events of one second is settled by reading Stripe."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from paystream.dev.localstripe import LocalStripe
from tests.support import Paystream, StripeJs, statuses_until, wait_until

pytestmark = pytest.mark.e2e

VISA, THREE_D_SECURE, DECLINED = "4242424242424242", "4000000000003220", "4000000000000341"


@pytest.fixture
async def stripe_js(local_stripe: LocalStripe) -> AsyncIterator[StripeJs]:
    async with StripeJs(local_stripe.url) as js:
        yield js


async def monthly_price(js: StripeJs, amount: int = 1500) -> str:
    resp = await js.http.post("/v1/prices", data={"currency": "usd", "unit_amount": str(amount),
                                                  "recurring[interval]": "month", "product_data[name]": "Monthly"})
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


async def default_card(js: StripeJs, customer: str, number: str) -> None:
    pm = await js.http.post("/v1/payment_methods", data={
        "type": "card", "card[number]": number, "card[exp_month]": "12", "card[exp_year]": "2030",
        "card[cvc]": "123"})
    pm_id = pm.json()["id"]
    assert (await js.http.post(f"/v1/payment_methods/{pm_id}/attach", data={"customer": customer})).status_code == 200
    resp = await js.http.post(f"/v1/customers/{customer}", data={"invoice_settings[default_payment_method]": pm_id})
    assert resp.status_code == 200, resp.text


async def subscribe(ps: Paystream, customer: str, price: str, **extra: object) -> dict:
    resp = await ps.http.post("/v1/transactions", headers=ps.backend,
                              json={"kind": "subscription", "customer_id": customer, "price": price, **extra})
    assert resp.status_code == 201, resp.text
    return resp.json()


async def test_a_customer_with_a_default_card_is_active_at_once(ps: Paystream, stripe_js: StripeJs) -> None:
    customer, price = await stripe_js.customer(), await monthly_price(stripe_js)
    await default_card(stripe_js, customer, VISA)
    created = await subscribe(ps, customer, price, metadata={"plan": "monthly"})
    txn = created["transaction"]
    assert (txn["kind"], txn["status"], txn["amount"], txn["currency"]) == ("subscription", "active", 1500, "usd")
    assert txn["stripe_id"].startswith("sub_") and created["client_secret"] is None
    assert txn["current_period_end"] and txn["cancel_at_period_end"] is False and txn["trial_end"] is None
    # ?await=active answers at once; the stream stays open through active (it is not an end).
    answer = (await ps.http.get(f"/v1/transactions/{txn['id']}", params={
        "await": "active", "timeout": "5", "token": created["stream_token"]})).json()
    assert (answer["status"], answer["timed_out"]) == ("active", False)
    # Its first invoice is a transaction of its own, readable with the customer's token.
    invoices = (await stripe_js.http.get("/v1/invoices", params={"subscription": txn["stripe_id"]})).json()["data"]
    assert len(invoices) == 1

    async def invoice_paid() -> dict | None:
        resp = await ps.http.get(f"/v1/transactions/{invoices[0]['id']}", params={"token": ps.token(cus=customer)})
        body = resp.json() if resp.status_code == 200 else {}
        return body if body.get("status") == "succeeded" and body.get("subscription_id") else None

    invoice = await wait_until(invoice_paid, 20, "the first invoice, paid, with its subscription_id")
    assert (invoice["kind"], invoice["subscription_id"], invoice["amount"]) == ("invoice", txn["stripe_id"], 1500)


@pytest.mark.parametrize("card", [VISA, THREE_D_SECURE])
async def test_without_a_default_card_the_page_pays_the_first_invoice(card: str, ps: Paystream,
                                                                      stripe_js: StripeJs) -> None:
    customer, price = await stripe_js.customer(), await monthly_price(stripe_js, 2900)
    created = await subscribe(ps, customer, price, quantity=2)
    txn = created["transaction"]
    assert (txn["status"], txn["amount"]) == ("incomplete", 5800)
    secret = created["client_secret"]
    assert secret and secret.startswith("pi_")
    pi = secret.split("_secret_")[0]
    async with ps.sse(txn["id"], token=created["stream_token"]) as stream:
        assert (await stream.event()).json["status"] == "incomplete"
        confirm = await stripe_js.pay(pi, card)
        assert confirm.status_code == 200, confirm.text
        if card == THREE_D_SECURE:
            assert confirm.json()["status"] == "requires_action"
            assert (await stripe_js.authenticate(pi, secret)).status_code == 200
        pushed = await statuses_until(stream, "active")
    assert pushed[-1]["previous_status"] == "incomplete" and pushed[-1]["last_error"] is None


async def test_a_failed_renewal_is_past_due_and_a_paid_retry_active(ps: Paystream, stripe_js: StripeJs) -> None:
    customer, price = await stripe_js.customer(), await monthly_price(stripe_js)
    await default_card(stripe_js, customer, VISA)
    created = await subscribe(ps, customer, price)
    sub = created["transaction"]["stripe_id"]
    async with ps.sse(created["transaction"]["id"], token=created["stream_token"]) as stream:
        assert (await stream.event()).json["status"] == "active"
        await default_card(stripe_js, customer, DECLINED)
        renewal = (await stripe_js.http.post("/v1/invoices", data={"customer": customer, "subscription": sub})).json()
        assert (await stripe_js.http.post(f"/v1/invoices/{renewal['id']}/pay")).status_code == 402
        past_due = (await statuses_until(stream, "past_due"))[-1]
        assert past_due["last_error"]["code"] == "card_declined"
        assert past_due["next_payment_attempt"] is not None
        await default_card(stripe_js, customer, VISA)
        assert (await stripe_js.http.post(f"/v1/invoices/{renewal['id']}/pay")).status_code == 200
        active = (await statuses_until(stream, "active"))[-1]
    assert active["last_error"] is None and active["next_payment_attempt"] is None
    assert active["cause"]["type"] == "paystream.subscription.read"  # no customer.subscription.updated came


async def test_cancel_at_period_end_then_now(ps: Paystream, stripe_js: StripeJs) -> None:
    customer, price = await stripe_js.customer(), await monthly_price(stripe_js)
    await default_card(stripe_js, customer, VISA)
    created = await subscribe(ps, customer, price)
    txn_id = created["transaction"]["id"]
    async with ps.sse(txn_id, token=created["stream_token"]) as stream:
        await stream.event()
        resp = await ps.http.post(f"/v1/transactions/{txn_id}/cancel", headers=ps.backend,
                                  json={"at_period_end": True})
        assert resp.status_code == 200, resp.text
        assert (resp.json()["transaction"]["status"], resp.json()["transaction"]["cancel_at_period_end"]) == (
            "active", True)
        pushed = (await stream.event(timeout=20)).json
        assert (pushed["status"], pushed["cancel_at_period_end"]) == ("active", True)
        resp = await ps.http.post(f"/v1/transactions/{txn_id}/cancel", headers=ps.backend)
        assert resp.status_code == 200 and resp.json()["transaction"]["status"] == "canceled"
        rest = await stream.rest(timeout=20)  # canceled ends the stream
    assert rest[-1].json["status"] == "canceled"
    again = await ps.http.post(f"/v1/transactions/{txn_id}/cancel", headers=ps.backend)
    assert (again.status_code, again.json()["error"]["code"]) == (409, "not_cancelable")
    bad = await ps.http.post(f"/v1/transactions/{txn_id}/cancel", headers=ps.backend, json={"at_period_end": "x"})
    assert bad.status_code in (400, 409)
    assert (await ps.http.post(f"/v1/transactions/{txn_id}/cancel")).status_code == 401


async def test_bad_input_is_refused_and_nothing_is_stored(ps: Paystream, stripe_js: StripeJs,
                                                          db: asyncpg.Connection) -> None:
    customer, price = await stripe_js.customer(), await monthly_price(stripe_js)
    cases = [({"customer_id": customer, "price": "price_nope"}, "unknown_price"),
             ({"customer_id": "cus_nope", "price": price}, "unknown_customer"),
             ({"customer_id": customer}, "bad_request"),
             ({"customer_id": customer, "price": price, "amount": 100}, "bad_request"),
             ({"customer_id": customer, "price": price, "quantity": 0}, "bad_request")]
    for body, code in cases:
        resp = await ps.http.post("/v1/transactions", headers=ps.backend, json={"kind": "subscription", **body})
        assert (resp.status_code, resp.json()["error"]["code"]) == (400, code), (body, resp.text)
    one_off = (await stripe_js.http.post("/v1/prices", data={"currency": "usd", "unit_amount": "500"})).json()["id"]
    resp = await ps.http.post("/v1/transactions", headers=ps.backend,
                              json={"kind": "subscription", "customer_id": customer, "price": one_off})
    assert (resp.status_code, resp.json()["error"]["code"]) == (400, "price_not_recurring")
    assert await db.fetchval("SELECT count(*) FROM transactions WHERE customer_id IN ($1, 'cus_nope')", customer) == 0


async def test_a_tie_is_settled_by_reading_stripe(ps: Paystream, stripe_js: StripeJs, db: asyncpg.Connection) -> None:
    customer, price = await stripe_js.customer(), await monthly_price(stripe_js)
    await default_card(stripe_js, customer, VISA)
    created = await subscribe(ps, customer, price)
    txn_id, sub = created["transaction"]["id"], created["transaction"]["stripe_id"]

    async def settled() -> bool:  # the emulator's own events and the reads they asked for are in
        pending = await db.fetchval("SELECT count(*) FROM outbox WHERE transaction_id = $1 AND done_at IS NULL",
                                    txn_id)
        seen = await db.fetchval("SELECT count(*) FROM stripe_events WHERE object_id = $1 AND processed_at"
                                 " IS NOT NULL AND type = 'customer.subscription.created'", sub)
        return pending == 0 and seen == 1

    await wait_until(settled, 20, "the subscription's events applied")
    obj = (await stripe_js.http.get(f"/v1/subscriptions/{sub}")).json()
    at = int((await db.fetchval("SELECT status_at FROM transactions WHERE id = $1", txn_id)).timestamp())
    seq = (await ps.get(txn_id)).json()["seq"]
    tie = {"id": f"evt_tie{int(time.time() * 1000)}", "object": "event", "type": "customer.subscription.updated",
           "created": at, "api_version": "2017-08-15", "livemode": False,
           "data": {"object": {**obj, "status": "past_due"}}}
    assert (await ps.deliver(tie))["outcome"] == "no_change"

    async def read_again() -> bool:
        return await db.fetchval("SELECT done_at IS NOT NULL AND attempts > 0 FROM outbox WHERE transaction_id = $1"
                                 " AND kind = 'read_subscription'", txn_id)

    await wait_until(read_again, 20, "the read the tie asked for")
    after = (await ps.get(txn_id)).json()
    assert after["status"] == "active"  # what Stripe says, not the tied event
    assert not await db.fetchval("SELECT count(*) FROM transaction_events WHERE transaction_id = $1 AND seq > $2"
                                 " AND status = 'past_due'", txn_id, seq)
