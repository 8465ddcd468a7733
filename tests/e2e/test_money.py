"""Money stays right (issue 14's adversarial review): a Stripe object that names one of
our transactions but is not its object links to nothing; a dispute reverses a wallet
credit and a won dispute posts it back, once each, in any order; odd but signed bodies
get a precise 400 or are kept for operators, never a 500, and touch nothing stored."""

from __future__ import annotations

import itertools
import json
import random
import re
import time

import asyncpg
import pytest

from paystream.changes.store import new_transaction_id
from paystream.dev import trigger
from paystream.dev.localstripe import LocalStripe
from tests.support import Paystream, StripeJs

pytestmark = pytest.mark.e2e


async def create(ps: Paystream, **body: object) -> dict:
    resp = await ps.http.post("/v1/transactions", json=body, headers=ps.backend)
    assert resp.status_code == 201, resp.text
    return resp.json()["transaction"]


async def fingerprint(db: asyncpg.Connection, pi: str) -> tuple:
    """What a refused or kept event about `pi` must not make: a transaction of `pi`, a log
    or ledger entry of one.  (Scoped to `pi`: the suite's server may apply another test's
    late webhook meanwhile.)"""
    return tuple(await db.fetchrow(
        """SELECT (SELECT count(*) FROM transactions WHERE stripe_id = $1),
                  (SELECT count(*) FROM transaction_events e JOIN transactions t ON t.id = e.transaction_id
                    WHERE t.stripe_id = $1),
                  (SELECT count(*) FROM ledger_entries l JOIN transactions t ON t.id = l.transaction_id
                    WHERE t.stripe_id = $1)""", pi))


async def metric(ps: Paystream, name: str) -> float:
    text = (await ps.http.get("/metrics", headers=ps.backend)).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


# --- a PaymentIntent naming another transaction --------------------------------------


async def test_a_payment_intent_naming_a_linked_transaction_moves_nothing(
        ps: Paystream, db: asyncpg.Connection) -> None:
    """Seen: a 1 JPY PaymentIntent whose metadata named a 2,500 USD transaction marked it
    succeeded.  It is now kept as `mismatched`, applied to nothing, and counted."""
    victim = await create(ps, kind="payment", amount=250000, currency="usd")
    before = await metric(ps, "paystream_events_mismatched_total")
    stranger = trigger.stripe_id("pi_")
    for step in ("payment_intent.processing", "payment_intent.succeeded"):
        event = ps.event(step, stranger, amount=1, currency="jpy", metadata={"transaction_id": victim["id"]})
        answer = await ps.deliver(event)
        assert answer["outcome"] == "mismatched", answer
        stored = await db.fetchrow("SELECT outcome, transaction_id, error FROM stripe_events WHERE id = $1",
                                   event["id"])
        assert stored["outcome"] == "mismatched" and stored["transaction_id"] is None
        assert victim["stripe_id"] in stored["error"]
    now = (await ps.get(victim["id"])).json()
    assert (now["status"], now["seq"], now["stripe_id"]) == (victim["status"], victim["seq"], victim["stripe_id"])
    assert await db.fetchval("SELECT count(*) FROM transaction_links WHERE stripe_id = $1", stranger) == 0
    assert await metric(ps, "paystream_events_mismatched_total") == before + 2


@pytest.mark.parametrize(("field", "value"), [("amount", 1), ("currency", "jpy"), ("customer", "cus_someone_else")])
async def test_an_unlinked_transaction_is_linked_only_to_its_own_object(
        ps: Paystream, db: asyncpg.Connection, field: str, value: object) -> None:
    """Between our commit and storing Stripe's answer, a transaction has no Stripe id: an
    event naming it links it only if amount, currency and customer agree."""
    txn_id = new_transaction_id()
    await db.execute(
        """INSERT INTO transactions (id, kind, status, amount, currency, customer_id, seq)
           VALUES ($1, 'payment', 'requires_payment_method', 2500, 'usd', 'cus_owner', 0)""", txn_id)
    good = {"amount": 2500, "currency": "usd", "customer": "cus_owner"}
    wrong = ps.event("payment_intent.succeeded", trigger.stripe_id("pi_"),
                     metadata={"transaction_id": txn_id}, **{**good, field: value})
    assert (await ps.deliver(wrong))["outcome"] == "mismatched"
    assert await db.fetchval("SELECT stripe_id FROM transactions WHERE id = $1", txn_id) is None
    own = trigger.stripe_id("pi_")
    right = ps.event("payment_intent.succeeded", own, metadata={"transaction_id": txn_id}, **good)
    assert (await ps.deliver(right))["outcome"] == "applied"
    row = await db.fetchrow("SELECT stripe_id, status FROM transactions WHERE id = $1", txn_id)
    assert (row["stripe_id"], row["status"]) == (own, "succeeded")


# --- disputes and the wallet -----------------------------------------------------------


def wallet_story(ps: Paystream, pi: str, t: int, *, won: bool, dispute_first: bool) -> list[dict]:
    """Stripe's events for a wallet top-up our API created (so the transaction already
    knows its customer and kind), then a dispute: with dispute_first, the dispute's
    events are older than the success's, as when the success event was delayed."""
    du = trigger.stripe_id("du_")
    dispute_at = t - 50 if dispute_first else t + 5
    events = [ps.event("payment_intent.processing", pi, amount=5000, created=t),
              ps.event("payment_intent.succeeded", pi, amount=5000, created=t + 1),
              ps.event("charge.dispute.created", pi, amount=5000, created=dispute_at, dispute_id=du)]
    if won:
        events.append(ps.event("charge.dispute.closed", pi, amount=5000, created=dispute_at + 10,
                               dispute_id=du, dispute_status="won"))
    return events


async def top_up(ps: Paystream, local_stripe: LocalStripe) -> tuple[str, str]:
    async with StripeJs(local_stripe.url) as stripe_js:
        customer = await stripe_js.customer()
    txn = await create(ps, kind="wallet_top_up", amount=5000, currency="usd", customer_id=customer)
    return customer, txn["stripe_id"]


async def balance(db: asyncpg.Connection, customer: str) -> int:
    return await db.fetchval("SELECT coalesce(sum(amount), 0) FROM ledger_entries WHERE account = $1",
                             f"wallet:{customer}")


@pytest.mark.parametrize(("won", "dispute_first"), list(itertools.product((False, True), repeat=2)))
async def test_a_dispute_reverses_a_wallet_credit_and_a_won_one_posts_it_back(
        ps: Paystream, db: asyncpg.Connection, local_stripe: LocalStripe, won: bool, dispute_first: bool) -> None:
    customer, pi = await top_up(ps, local_stripe)
    events = wallet_story(ps, pi, int(time.time()) - 600, won=won, dispute_first=dispute_first)
    deliveries = [e for e in events for _ in range(3)]
    seed = random.randrange(1 << 30)
    print(f"delivery order seed: {seed}")
    random.Random(seed).shuffle(deliveries)
    for event in deliveries:
        await ps.deliver(event)
    state = (await ps.get(pi)).json()
    assert state["status"] == "disputed"
    assert state["dispute"]["status"] == ("won" if won else "needs_response")
    assert await balance(db, customer) == (5000 if won else 0)
    groups = await db.fetch(
        """SELECT split_part(entry_group, ':', 1) AS kind, sum(amount) AS total, count(*) AS rows
             FROM ledger_entries WHERE account = $1 GROUP BY 1 ORDER BY 1""", f"wallet:{customer}")
    expected = [("dispute", -5000, 1), *([("dispute_won", 5000, 1)] if won else []), ("topup", 5000, 1)]
    assert [(g["kind"], g["total"], g["rows"]) for g in groups] == expected
    last = await db.fetchval(
        """SELECT data::text FROM transaction_events e JOIN transactions t ON t.id = e.transaction_id
            WHERE t.stripe_id = $1 ORDER BY e.seq DESC LIMIT 1""", pi)
    assert json.loads(last)["balance"]["amount"] == (5000 if won else 0)


async def test_an_inquiry_withdraws_nothing(ps: Paystream, db: asyncpg.Connection, local_stripe: LocalStripe) -> None:
    customer, pi = await top_up(ps, local_stripe)
    await ps.deliver(ps.event("payment_intent.succeeded", pi, amount=5000))
    await ps.deliver(ps.event("charge.dispute.created", pi, amount=5000, dispute_status="warning_needs_response"))
    assert (await ps.get(pi)).json()["status"] == "disputed"
    assert await balance(db, customer) == 5000


async def test_a_zero_top_up_credits_nothing_and_answers_200(ps: Paystream, db: asyncpg.Connection) -> None:
    """Amounts that were coerced to 0 failed the ledger's CHECK with a 500, forever."""
    customer, pi = trigger.stripe_id("cus_"), trigger.stripe_id("pi_")
    answer = await ps.deliver(ps.event("payment_intent.succeeded", pi, amount=0, customer=customer,
                                       metadata={"paystream_kind": "wallet_top_up"}))
    assert answer["outcome"] == "applied"
    assert await balance(db, customer) == 0


# --- signed but odd bodies ---------------------------------------------------------------


def odd_bodies() -> list[tuple[str, str, str]]:
    """(name, body text, what it must get): each one signed with the right secret."""
    def with_(path: tuple[str, ...], value_json: str) -> str:
        marker = "\"__odd__\""
        event = trigger.build("payment_intent.succeeded", trigger.stripe_id("pi_"))  # a fresh evt_ id each
        target = event
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = "__odd__"
        return json.dumps(event).replace(marker, value_json)

    return [
        ("lone surrogate in the object id", with_(("data", "object", "id"), '"pi_\\ud800"'), "400"),
        ("NUL in type", with_(("type",), '"payment_intent.succeeded\\u0000"'), "400"),
        ("500,000-character event id", with_(("id",), json.dumps("evt_" + "x" * 500_000)), "400"),
        ("created 2^40 - 1", with_(("created",), str(2**40 - 1)), "400"),
        ("NUL in metadata", with_(("data", "object", "metadata"), '{"k": "a\\u0000b"}'), "invalid"),
        ("lone surrogate in metadata", with_(("data", "object", "metadata"), '{"k": "\\udc80"}'), "invalid"),
        ("negative amount", with_(("data", "object", "amount"), "-5"), "invalid"),
        ("amount above 2^63", with_(("data", "object", "amount"), str(2**64)), "invalid"),
        ("NaN amount", with_(("data", "object", "amount"), "NaN"), "invalid"),
        ("1e400 amount", with_(("data", "object", "amount"), "1e400"), "invalid"),
    ]


@pytest.mark.parametrize(("name", "body", "expected"), odd_bodies(), ids=[b[0] for b in odd_bodies()])
async def test_signed_but_odd_events_get_a_precise_answer_and_touch_nothing(
        ps: Paystream, db: asyncpg.Connection, name: str, body: str, expected: str) -> None:
    # Every odd body is about a fresh PaymentIntent; its client_secret names it even where
    # the object's id itself is what is odd.
    pi = re.search(r"pi_[0-9A-Za-z]+", body).group(0)  # type: ignore[union-attr]
    for _ in range(2):  # Stripe's retry gets the same answer
        resp = await ps.send(body=body)
        if expected == "400":
            assert resp.status_code == 400, resp.text
            assert resp.json()["error"]["code"] == "malformed_body"
        else:
            assert resp.status_code == 200, resp.text
            assert resp.json()["outcome"] == "invalid"
    assert await fingerprint(db, pi) == (0, 0, 0)
    if expected == "invalid":
        event_id = json.loads(body, parse_constant=lambda c: 0)["id"]
        stored = await db.fetchrow("SELECT outcome, processed_at, error, attempts FROM stripe_events WHERE id = $1",
                                   event_id)
        assert stored["outcome"] == "invalid" and stored["processed_at"] is None and stored["error"]
        assert stored["attempts"] == 2


async def test_a_signature_from_the_future_is_refused(ps: Paystream) -> None:
    event = ps.event("payment_intent.succeeded", trigger.stripe_id("pi_"))
    resp = await ps.send(event, timestamp=int(time.time()) + 3600)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "stale_signature"
    ok = await ps.send(event, timestamp=int(time.time()) + 60)  # within the tolerance: clocks drift
    assert ok.status_code == 200, ok.text


# --- a reversal never drives a wallet below zero (issue 22, item 2) -------------------


@pytest.mark.parametrize("refunded", [2000, 5000])
async def test_a_dispute_after_a_refund_reverses_only_what_is_still_credited(
        ps: Paystream, db: asyncpg.Connection, local_stripe: LocalStripe, refunded: int) -> None:
    """A 5,000 top-up refunded in part (or whole), then disputed for all of it: the
    dispute takes back what the refund left, and winning it returns just that."""
    customer, pi = await top_up(ps, local_stripe)
    t, du = int(time.time()) - 600, trigger.stripe_id("du_")
    await ps.deliver(ps.event("payment_intent.succeeded", pi, amount=5000, created=t))
    await ps.deliver(ps.event("charge.refunded", pi, amount=5000, amount_refunded=refunded, created=t + 1))
    assert await balance(db, customer) == 5000 - refunded
    await ps.deliver(ps.event("charge.dispute.created", pi, amount=5000, created=t + 2, dispute_id=du))
    assert await balance(db, customer) == 0
    await ps.deliver(ps.event("charge.dispute.closed", pi, amount=5000, created=t + 3, dispute_id=du,
                              dispute_status="won"))
    assert await balance(db, customer) == 5000 - refunded
    running_low = await db.fetchval(
        "SELECT min(s) FROM (SELECT sum(amount) OVER (ORDER BY id) AS s FROM ledger_entries WHERE account = $1) r",
        f"wallet:{customer}")
    assert running_low >= 0  # at no point below zero


@pytest.mark.parametrize("event_type", ["charge.refunded", "charge.dispute.created"])
async def test_a_refund_or_dispute_above_the_amount_paid_is_invalid(
        ps: Paystream, db: asyncpg.Connection, local_stripe: LocalStripe, event_type: str) -> None:
    customer, pi = await top_up(ps, local_stripe)
    await ps.deliver(ps.event("payment_intent.succeeded", pi, amount=5000))
    before = (await ps.get(pi)).json()
    if event_type == "charge.refunded":  # the charge says more was refunded than it was for
        event = ps.event(event_type, pi, amount=5000, amount_refunded=5001)
    else:  # a dispute of more than the transaction was paid
        event = ps.event(event_type, pi, amount=5001)
    answer = await ps.deliver(event)
    assert answer["outcome"] == "invalid"
    assert (await ps.get(pi)).json() == before
    assert await balance(db, customer) == 5000
    stored = await db.fetchrow("SELECT outcome, processed_at, error FROM stripe_events WHERE id = $1", event["id"])
    assert stored["outcome"] == "invalid" and stored["processed_at"] is None and "5001" in stored["error"]
