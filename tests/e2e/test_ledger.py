"""The ledger of every money movement (issue 24 section 3), through the real server:
captured payments, partial and full refunds, a failed refund put back, disputes withdrawn,
won and lost, each posted once whatever the duplicates and order; every group sums to
zero and the database refuses one that does not, and any edit; `paystream ledger` prints
and checks it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import asyncpg
import pytest

from paystream.db import migrate
from paystream.dev import trigger
from tests.conftest import Server
from tests.support import Paystream

pytestmark = pytest.mark.e2e

A = 10000


async def moved(db: asyncpg.Connection, txn_id: str) -> dict[str, int]:
    rows = await db.fetch("""SELECT account, sum(amount)::bigint AS total FROM ledger_entries
                              WHERE transaction_id = $1 GROUP BY 1""", txn_id)
    return {r["account"]: r["total"] for r in rows if r["total"]}


async def groups(db: asyncpg.Connection, txn_id: str) -> dict[str, list[tuple[str, int]]]:
    rows = await db.fetch("""SELECT entry_group, account, amount FROM ledger_entries
                              WHERE transaction_id = $1 ORDER BY id""", txn_id)
    out: dict[str, list[tuple[str, int]]] = {}
    for r in rows:
        out.setdefault(r["entry_group"], []).append((r["account"], r["amount"]))
    return out


async def assert_balanced(db: asyncpg.Connection) -> None:
    bad = await db.fetch("""SELECT entry_group, currency, sum(amount) FROM ledger_entries
                             GROUP BY 1, 2 HAVING sum(amount) <> 0""")
    assert bad == []


async def deliver_shuffled(ps: Paystream, events: list[dict], times: int = 3) -> None:
    deliveries = [e for e in events for _ in range(times)]
    seed = random.randrange(1 << 30)
    print(f"delivery order seed: {seed}")
    random.Random(seed).shuffle(deliveries)
    for event in deliveries:
        await ps.deliver(event)


def ledger_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "paystream", "ledger", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "DATABASE_URL": url})


def refund_failed(pi: str, amount: int, created: int | None = None) -> dict:
    refund = {"id": trigger.stripe_id("re_"), "object": "refund", "amount": amount, "currency": "usd",
              "payment_intent": pi, "status": "failed", "failure_reason": "expired_or_canceled_card"}
    return trigger.envelope("refund.failed", refund, created=created)


@pytest.mark.parametrize("final", [6000, A])
async def test_a_payment_and_its_refunds_post_once_in_any_order(
        ps: Paystream, db: asyncpg.Connection, server: Server, final: int) -> None:
    pi, t = trigger.stripe_id("pi_"), int(time.time()) - 60
    events = [ps.event("payment_intent.processing", pi, amount=A, created=t),
              ps.event("payment_intent.succeeded", pi, amount=A, created=t + 1),
              *(ps.event("charge.refunded", pi, amount=A, amount_refunded=total, created=t + 2 + k)
                for k, total in enumerate(sorted({2500, final})))]
    await deliver_shuffled(ps, events)
    txn = (await ps.get(pi)).json()
    assert (txn["status"], txn["amount_refunded"]) == ("refunded" if final == A else "partially_refunded", final)
    assert await moved(db, txn["id"]) == (
        {} if final == A else {"merchant:revenue": A - final, "stripe:clearing": final - A})
    posted = await groups(db, txn["id"])
    assert posted[f"capture:{txn['id']}"] == [("stripe:clearing", -A), ("merchant:revenue", A)]
    refunds = {g: legs for g, legs in posted.items() if g.startswith("refund:")}
    assert -sum(amount for legs in refunds.values() for account, amount in legs if account == "merchant:revenue") \
        == final
    assert set(posted) == {f"capture:{txn['id']}", *refunds}
    await assert_balanced(db)
    out = ledger_cli(server.database_url, "--check", "--transaction", pi)
    assert (out.returncode, out.stdout.strip()) == (0, '{"problems": 0}'), out.stderr


@pytest.mark.parametrize(("closed", "expected"), [
    (None, {"merchant:revenue": A, "stripe:disputed": -A}),       # funds withdrawn, still open
    ("won", {"merchant:revenue": A, "stripe:clearing": -A}),      # reinstated
    ("lost", {}),                                                 # gone: revenue reversed
])
async def test_a_dispute_withdraws_reinstates_or_loses_the_funds_once(
        ps: Paystream, db: asyncpg.Connection, closed: str | None, expected: dict[str, int]) -> None:
    pi, du, t = trigger.stripe_id("pi_"), trigger.stripe_id("du_"), int(time.time()) - 60
    events = [ps.event("payment_intent.succeeded", pi, amount=A, created=t),
              ps.event("charge.dispute.created", pi, amount=A, dispute_id=du, created=t + 5)]
    if closed:
        events.append(ps.event("charge.dispute.closed", pi, amount=A, dispute_id=du, dispute_status=closed,
                               created=t + 9))
    await deliver_shuffled(ps, events)
    txn = (await ps.get(pi)).json()
    assert txn["dispute"]["status"] == (closed or "needs_response")
    assert await moved(db, txn["id"]) == expected
    posted = await groups(db, txn["id"])
    assert sorted(g.split(":")[0] for g in posted) == sorted(["capture", "dispute", *([f"dispute_{closed}"]
                                                                                     if closed else [])])
    await assert_balanced(db)


async def test_an_inquiry_moves_no_funds(ps: Paystream, db: asyncpg.Connection) -> None:
    pi = trigger.stripe_id("pi_")
    await ps.deliver(ps.event("payment_intent.succeeded", pi, amount=A))
    await ps.deliver(ps.event("charge.dispute.created", pi, amount=A, dispute_status="warning_needs_response"))
    txn = (await ps.get(pi)).json()
    assert txn["status"] == "disputed"
    assert await moved(db, txn["id"]) == {"merchant:revenue": A, "stripe:clearing": -A}


async def test_a_failed_refund_is_put_back_once_before_or_after_its_refund(
        ps: Paystream, db: asyncpg.Connection, server: Server) -> None:
    pi, t = trigger.stripe_id("pi_"), int(time.time()) - 60
    await ps.deliver(ps.event("payment_intent.succeeded", pi, amount=A, created=t))
    failed = refund_failed(pi, 3000, created=t + 3)
    await deliver_shuffled(ps, [ps.event("charge.refunded", pi, amount=A, amount_refunded=3000, created=t + 2),
                                failed])
    txn = (await ps.get(pi)).json()  # (its last_error: the failure, or none if the refund's event came after)
    assert await moved(db, txn["id"]) == {"merchant:revenue": A, "stripe:clearing": -A}
    posted = await groups(db, txn["id"])
    assert posted[f"refund_failed:{txn['id']}:{failed['data']['object']['id']}"] == [
        ("merchant:revenue", 3000), ("stripe:clearing", -3000)]
    assert posted[f"refund:{txn['id']}:3000"] == [("merchant:revenue", -3000), ("stripe:clearing", 3000)]
    await assert_balanced(db)
    out = ledger_cli(server.database_url, "--check", "--transaction", txn["id"])
    assert out.returncode == 0, out.stdout + out.stderr


async def test_a_failed_refund_of_a_top_up_gives_the_wallet_back_what_it_took(
        ps: Paystream, db: asyncpg.Connection) -> None:
    pi, customer, t = trigger.stripe_id("pi_"), trigger.stripe_id("cus_"), int(time.time()) - 60
    kind = {"paystream_kind": "wallet_top_up"}
    await ps.deliver(ps.event("payment_intent.succeeded", pi, amount=5000, customer=customer, metadata=kind,
                              created=t))
    await ps.deliver(ps.event("charge.refunded", pi, amount=5000, amount_refunded=2000, customer=customer,
                              metadata=kind, created=t + 1))
    txn = (await ps.get(pi)).json()
    assert await moved(db, txn["id"]) == {f"wallet:{customer}": 3000, "stripe:clearing": -3000}
    failed = refund_failed(pi, 2000, created=t + 2)
    for _ in range(2):
        await ps.deliver(failed)
    assert await moved(db, txn["id"]) == {f"wallet:{customer}": 5000, "stripe:clearing": -5000}
    await assert_balanced(db)


@pytest.mark.parametrize("failure_first", [True, False])
async def test_a_top_up_refund_that_failed_is_given_back_whichever_event_came_first(
        ps: Paystream, db: asyncpg.Connection, failure_first: bool) -> None:
    """A refund's failure delivered before the charge.refunded that counted it: the wallet
    was reversed after the failure was seen, and is still given back (the put-back follows
    the failed refunds the transaction lists, not only the event that reports one)."""
    pi, customer, t = trigger.stripe_id("pi_"), trigger.stripe_id("cus_"), int(time.time()) - 60
    kind = {"paystream_kind": "wallet_top_up"}
    await ps.deliver(ps.event("payment_intent.succeeded", pi, amount=5000, customer=customer, metadata=kind,
                              created=t))
    refunded = ps.event("charge.refunded", pi, amount=5000, amount_refunded=30, customer=customer, metadata=kind,
                        created=t + 1)
    failed = refund_failed(pi, 30, created=t + 2)
    for event in ([failed, refunded] if failure_first else [refunded, failed]):
        await ps.deliver(event)
    txn = (await ps.get(pi)).json()
    assert await moved(db, txn["id"]) == {f"wallet:{customer}": 5000, "stripe:clearing": -5000}
    await assert_balanced(db)


async def test_the_database_refuses_an_unbalanced_group_and_any_edit(ps: Paystream, db: asyncpg.Connection) -> None:
    pi = trigger.stripe_id("pi_")
    await ps.deliver(ps.event("payment_intent.succeeded", pi, amount=A))
    txn_id = (await ps.get(pi)).json()["id"]
    before = await moved(db, txn_id)
    insert = """INSERT INTO ledger_entries (entry_group, transaction_id, account, amount, currency)
                VALUES ($1, $2, $3, $4, $5)"""
    for legs in ([("merchant:revenue", 100, "usd")],
                 [("merchant:revenue", 100, "usd"), ("stripe:clearing", -99, "usd")],
                 [("merchant:revenue", 100, "usd"), ("stripe:clearing", -100, "eur")]):
        with pytest.raises(asyncpg.CheckViolationError, match="does not balance"):
            async with db.transaction():
                for account, amount, currency in legs:
                    await db.execute(insert, f"manual:{txn_id}:{len(legs)}:{legs[-1][2]}", txn_id, account,
                                     amount, currency)
    # A group cannot be unbalanced later either, by adding a leg in another transaction.
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(insert, f"capture:{txn_id}", txn_id, "stripe:disputed", 5, "usd")
    for statement in ("UPDATE ledger_entries SET amount = amount * 2 WHERE transaction_id = $1",
                      "DELETE FROM ledger_entries WHERE transaction_id = $1"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await db.execute(statement, txn_id)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await db.execute("TRUNCATE ledger_entries CASCADE")
    assert await moved(db, txn_id) == before


async def test_the_ledger_command_prints_and_checks_a_database(own_database: str, fresh_stripe) -> None:  # noqa: ANN001
    """On a database of its own (the check reads every transaction): good, then with a
    transaction's amount_refunded and a group corrupted behind the schema's back."""
    await migrate(own_database)
    server = Server(own_database, {"STRIPE_API_BASE": fresh_stripe.url,
                                   "PAYSTREAM_BACKFILL_INTERVAL": "86400"}).start()
    try:
        async with Paystream(server) as ps:
            paid, disputed, t = trigger.stripe_id("pi_"), trigger.stripe_id("pi_"), int(time.time()) - 60
            for event in (ps.event("payment_intent.succeeded", paid, amount=A, created=t),
                          ps.event("charge.refunded", paid, amount=A, amount_refunded=4000, created=t + 1),
                          ps.event("payment_intent.succeeded", disputed, amount=2500, currency="eur", created=t),
                          ps.event("charge.dispute.closed", disputed, amount=2500, currency="eur",
                                   dispute_status="lost", created=t + 5)):
                await ps.deliver(event)
            paid_id = (await ps.get(paid)).json()["id"]
    finally:
        server.stop()
    out = ledger_cli(own_database, "--check")
    assert (out.returncode, out.stdout.strip()) == (0, '{"problems": 0}'), out.stdout + out.stderr

    listing = [json.loads(line) for line in ledger_cli(own_database).stdout.splitlines()]
    entries = [x["entry"] for x in listing if "entry" in x]
    assert {e["transaction_id"] for e in entries} == {paid_id, entries[-1]["transaction_id"]}
    balances = {(b["balance"]["account"], b["balance"]["currency"]): b["balance"]["amount"]
                for b in listing if "balance" in b}
    assert balances == {("merchant:revenue", "usd"): 6000, ("stripe:clearing", "usd"): -6000,
                        ("merchant:revenue", "eur"): 0, ("stripe:clearing", "eur"): 0,
                        ("stripe:disputed", "eur"): 0}
    only = [json.loads(line) for line in ledger_cli(own_database, "--transaction", paid).stdout.splitlines()]
    assert {x["entry"]["transaction_id"] for x in only if "entry" in x} == {paid_id}

    conn = await asyncpg.connect(own_database)
    try:
        await conn.execute("UPDATE transactions SET amount_refunded = 5000 WHERE id = $1", paid_id)
        out = ledger_cli(own_database, "--check")
        assert out.returncode == 1
        problems = [json.loads(line) for line in out.stdout.splitlines()]
        assert problems[-1] == {"problems": 1}
        assert problems[0]["problem"] == "transaction_disagrees" and problems[0]["transaction_id"] == paid_id
        # An unbalanced group, written with the triggers off (as a superuser could): found too.
        await conn.execute("UPDATE transactions SET amount_refunded = 4000 WHERE id = $1", paid_id)
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute("""INSERT INTO ledger_entries (entry_group, transaction_id, account, amount, currency)
                                  VALUES ('stray', $1, 'merchant:revenue', 1, 'usd')""", paid_id)
        out = ledger_cli(own_database, "--check")
        assert out.returncode == 1
        kinds = [json.loads(line).get("problem") for line in out.stdout.splitlines()]
        assert kinds == ["unbalanced_group", "transaction_disagrees", None]
    finally:
        await conn.close()
