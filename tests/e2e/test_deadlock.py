"""A webhook that Postgres rolls back to break a deadlock is applied again at once, not
answered 500 (which left the event failed until Stripe's retry, minutes to hours later).

The deadlock is made for real, in a known order: another session (the rival) holds the
ledger row the webhook's capture posting must insert, the webhook waits on it while
holding its transaction's row, and the rival then asks for that row.  Postgres looks for a
cycle once per wait, when the waiter's deadlock_timeout passes: the webhook's session (the
default, a second) finds it and is rolled back, while the rival's is longer.  Should the
rival's request come only after the webhook's one look (a stalled machine), the rival's
own look finds the cycle instead and the rival is rolled back: the round is played again
with new transactions."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from paystream.dev import trigger
from tests.e2e.test_money import metric
from tests.support import Paystream, wait_until

pytestmark = pytest.mark.e2e

ROUNDS = 3


async def blocked_by(db: asyncpg.Connection, pid: int) -> bool:
    """Some session waits on a lock `pid` holds."""
    return await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", pid) > 0


async def deadlock_round(ps: Paystream, db: asyncpg.Connection, database_url: str) -> tuple[str, str] | None:
    """One round; (txn, the webhook's answer text) if the webhook was the one rolled back,
    None if the rival was."""
    base = int(time.time()) - 60
    pi, other_pi = trigger.stripe_id("pi_"), trigger.stripe_id("pi_")
    for p in (pi, other_pi):
        await ps.deliver(ps.event("payment_intent.processing", p, created=base))
    txn, other_txn = (await ps.get(pi)).json()["id"], (await ps.get(other_pi)).json()["id"]
    rival = await asyncpg.connect(database_url)
    try:
        pid = rival.get_server_pid()
        held = rival.transaction()
        await held.start()
        await rival.execute("SET LOCAL deadlock_timeout = '3s'")  # the webhook's session looks first
        # The key of the revenue leg the webhook's `capture:` group will insert (tied to
        # another transaction, so that no lock on the webhook's own row is taken here).
        await rival.execute(
            """INSERT INTO ledger_entries (entry_group, transaction_id, account, amount, currency)
               VALUES ($1, $2, 'merchant:revenue', 1500, 'usd')""", f"capture:{txn}", other_txn)
        webhook = asyncio.create_task(ps.send(ps.event("payment_intent.succeeded", pi, created=base + 1)))
        await wait_until(lambda: blocked_by(db, pid), what="the webhook to wait on the rival's ledger row")
        try:
            # The other order: the rival asks for the row the webhook holds.
            assert await rival.fetchval("SELECT id FROM transactions WHERE id = $1 FOR UPDATE", txn) == txn
        except asyncpg.DeadlockDetectedError:
            await held.rollback()
            answer = await webhook  # applied once the rival let go: not this test's case
            assert answer.status_code == 200, answer.text
            return None
        # Postgres rolled the webhook back; its second attempt waits for the rival to let go.
        await wait_until(lambda: blocked_by(db, pid), what="the webhook's second attempt to wait on the rival")
        await held.rollback()
        answer = await webhook
    finally:
        await rival.close()
    assert answer.status_code == 200, answer.text
    return txn, answer.text


async def test_a_webhook_rolled_back_to_break_a_deadlock_is_applied_again(
        ps: Paystream, db: asyncpg.Connection, database_url: str) -> None:
    conflicts = await metric(ps, "paystream_webhook_conflicts_total")
    for _ in range(ROUNDS):
        played = await deadlock_round(ps, db, database_url)
        if played is not None:
            break
    assert played is not None, f"the rival, not the webhook, was rolled back in all {ROUNDS} rounds"
    txn, text = played
    assert '"outcome":"applied"' in text.replace(" ", ""), text
    assert (await ps.get(txn)).json()["status"] == "succeeded"
    assert await metric(ps, "paystream_webhook_conflicts_total") == conflicts + 1
    legs = await db.fetch("SELECT account, amount FROM ledger_entries WHERE entry_group = $1 ORDER BY account",
                          f"capture:{txn}")
    assert [(r["account"], r["amount"]) for r in legs] == [("merchant:revenue", 1500), ("stripe:clearing", -1500)]
