"""Built-in effect: the ledger of every money movement a transaction makes, and the
report and check behind `paystream ledger`.

Double entry in ledger_entries, credits positive and debits negative; every group is one
business fact that sums to zero per currency (the schema refuses any other at commit)
and the table is append-only, so a correction is always a new, reversing group.
Accounts: `stripe:clearing` (the money at Stripe), `merchant:revenue`, `stripe:disputed`
(funds a dispute holds), `wallet:<customer>` (what a customer's wallet holds) and
`merchant:discounts` (wallet credit coupons gave beyond what was paid).

* A transaction that took money (status succeeded or after it) posts `capture:<txn>`:
  clearing −amount, revenue +amount.  Wallet top-ups, and invoices made by POST
  /v1/transactions (the coupon flow, which add `amount_added` to the wallet), are the
  wallet effect's (effects/wallet.py): their money is the customer's, posted as
  `topup:<txn>` (an invoice's discount from `merchant:discounts`).
* A refund posts `refund:<txn>:<total>`: revenue −part, clearing +part, up to Stripe's
  running total `amount_refunded`.
* A failed refund (the transaction's `last_error` says `refund_failed`) is put back once,
  `refund_failed:<txn>:<re_…>`: the refund's groups are never edited.
* A dispute that withdrew the funds posts `dispute:<txn>:<du_…>` (clearing +d, disputed
  −d); won, `dispute_won:` moves them back; lost, `dispute_lost:` takes them from revenue.

Each group's key is a function of the facts it records (a transaction, a refund total, a
dispute, a refund id) and the posting reads the ledger before it adds the difference, so
duplicates, replays and any delivery order post each movement once.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg

from paystream.changes.lifecycle import DISPUTE_FUNDS_WITHDRAWN, REFUNDABLE
from paystream.effects.wallet import (
    CLEARING,
    DISCOUNTS,
    amount_added,
    credit_reversed,
    credits_wallet,
    failed_refunds,
    wallet_account,
)

log = logging.getLogger("paystream.effects.ledger")

REVENUE = "merchant:revenue"
DISPUTED = "stripe:disputed"
# Kinds whose money belongs to the customer's wallet rather than to the merchant's
# revenue (the wallet effect posts their credit, refunds and disputes).
WALLET_KINDS = frozenset({"wallet_top_up"})
DISPUTE_CLOSED = frozenset({"won", "lost"})
# A Checkout Session's money is its PaymentIntent's (or its subscription's invoices'), each
# a transaction of its own that posts it; the session only follows them (changes/follows.py).
NO_MONEY_OF_THEIR_OWN = frozenset({"checkout"})


async def _post(conn: asyncpg.Connection, group: str, txn: dict[str, Any],
                legs: list[tuple[str, int]]) -> bool:
    """One balanced group; nothing if its key was posted already."""
    if any(amount == 0 for _, amount in legs):
        return False
    inserted = await conn.fetchval(
        """WITH rows AS (
             INSERT INTO ledger_entries (entry_group, transaction_id, account, amount, currency)
             SELECT $1, $2, account, amount, $5 FROM unnest($3::text[], $4::bigint[]) AS l (account, amount)
             ON CONFLICT (entry_group, account) DO NOTHING RETURNING 1)
           SELECT count(*) FROM rows""",
        group, txn["id"], [a for a, _ in legs], [m for _, m in legs], txn["currency"])
    return inserted > 0


async def _sum(conn: asyncpg.Connection, txn_id: str, account: str, prefix: str) -> int:
    """What this transaction's groups starting with `prefix` moved `account` by."""
    return await conn.fetchval(
        """SELECT coalesce(sum(amount), 0)::bigint FROM ledger_entries
            WHERE transaction_id = $1 AND account = $2 AND starts_with(entry_group, $3)""",
        txn_id, account, prefix)


def captured(txn: dict[str, Any]) -> int:
    """What the transaction took.  (A partial capture, when the transaction carries
    `amount_captured`, took that.)"""
    if txn["status"] not in REFUNDABLE or txn["kind"] in NO_MONEY_OF_THEIR_OWN:
        return 0
    return max(0, int(txn.get("amount_captured", txn["amount"]) or 0))


def refunded(txn: dict[str, Any]) -> int:
    """Stripe's running total of refunds, never more than was taken.  Failed refunds are
    put back by their own groups (see failed_refund)."""
    return min(int(txn.get("amount_refunded") or 0), captured(txn))


def withdrawn_dispute(txn: dict[str, Any]) -> tuple[str, int, str] | None:
    """(id, amount, status) of a dispute that took the funds; None for none or an inquiry."""
    dispute = txn.get("dispute")
    if not dispute or dispute.get("status") not in DISPUTE_FUNDS_WITHDRAWN or not captured(txn):
        return None
    amount = min(int(dispute.get("amount") or 0), captured(txn))
    return (str(dispute["id"]), amount, str(dispute["status"])) if amount > 0 else None


class Ledger:
    name = "ledger"

    async def on_status(self, conn: asyncpg.Connection, transaction: dict[str, Any],
                        previous_status: str | None) -> dict[str, Any] | None:
        if credits_wallet(transaction):
            return None  # the wallet effect posts its money, failed refunds put back included
        taken = captured(transaction)
        if taken <= 0:
            return None
        txn_id = transaction["id"]
        await _post(conn, f"capture:{txn_id}", transaction, [(CLEARING, -taken), (REVENUE, taken)])
        # Refunds: up to Stripe's running total, keyed by it (it only grows), so a total
        # reported twice posts once and a jump posts the whole difference.
        done = -await _sum(conn, txn_id, REVENUE, f"refund:{txn_id}:")
        total = refunded(transaction)
        if total > done:
            await _post(conn, f"refund:{txn_id}:{total}", transaction,
                        [(REVENUE, done - total), (CLEARING, total - done)])
        for refund_id, failed_amount in await failed_refunds(conn, transaction):
            put_back = await _sum(conn, txn_id, REVENUE, f"refund_failed:{txn_id}:")
            amount = min(failed_amount, taken - put_back)
            if amount > 0:
                await _post(conn, f"refund_failed:{txn_id}:{refund_id}", transaction,
                            [(REVENUE, amount), (CLEARING, -amount)])
        dispute = withdrawn_dispute(transaction)
        if dispute:
            du, amount, status = dispute
            # The withdrawal first, even when the dispute's first event we see is its close.
            await _post(conn, f"dispute:{txn_id}:{du}", transaction, [(CLEARING, amount), (DISPUTED, -amount)])
            if status == "won":
                await _post(conn, f"dispute_won:{txn_id}:{du}", transaction,
                            [(CLEARING, -amount), (DISPUTED, amount)])
            elif status == "lost":
                await _post(conn, f"dispute_lost:{txn_id}:{du}", transaction,
                            [(REVENUE, -amount), (DISPUTED, amount)])
        return None



effect = Ledger()


# --- `paystream ledger` -----------------------------------------------------------------


def _filters(transaction: str | None, customer: str | None, since: datetime | None) -> tuple[str, list[Any]]:
    where, args = ["true"], []
    if transaction:
        args.append(transaction)
        where.append(f"(t.id = ${len(args)} OR t.stripe_id = ${len(args)})")
    if customer:
        args.append(customer)
        where.append(f"(t.customer_id = ${len(args)} OR e.account = 'wallet:' || ${len(args)})")
    if since:
        args.append(since)
        where.append(f"e.created_at >= ${len(args)}")
    return " AND ".join(where), args


def _transaction_filters(transaction: str | None, customer: str | None, since: datetime | None,
                         first: int) -> tuple[str, list[Any]]:
    where, args = ["true"], []
    for value, test in ((transaction, "(t.id = ${n} OR t.stripe_id = ${n})"), (customer, "t.customer_id = ${n}"),
                        (since, "t.updated_at >= ${n}")):
        if value:
            args.append(value)
            where.append(test.replace("{n}", str(first + len(args) - 1)))
    return " AND ".join(where), args


async def report(conn: asyncpg.Connection | asyncpg.Pool, *, transaction: str | None = None,
                 customer: str | None = None, since: datetime | None = None) -> AsyncIterator[dict[str, Any]]:
    """The entries the filters select, oldest first, then each account's balance over them."""
    where, args = _filters(transaction, customer, since)
    rows = await conn.fetch(
        f"""SELECT e.id, e.entry_group, e.transaction_id, e.account, e.amount, e.currency, e.created_at
              FROM ledger_entries e JOIN transactions t ON t.id = e.transaction_id
             WHERE {where} ORDER BY e.id""", *args)
    balances: dict[tuple[str, str], int] = defaultdict(int)
    for r in rows:
        balances[(r["account"], r["currency"])] += r["amount"]
        yield {"entry": {**dict(r), "created_at": r["created_at"].isoformat()}}
    for (account, currency), amount in sorted(balances.items()):
        yield {"balance": {"account": account, "currency": currency, "amount": amount}}


def expected(txn: dict[str, Any], put_back: int) -> dict[str, int]:
    """What a transaction's money should have moved each account by, from its status and
    amounts (for a wallet top-up, only where no dispute or failed refund makes the wallet
    effect's caps matter).  `put_back`: what its failed refunds gave back, as posted."""
    taken = captured(txn)
    added = amount_added(txn)
    if added is not None:  # an invoice of the coupon flow: see effects/wallet.py
        if not txn.get("customer_id") or txn["status"] not in REFUNDABLE:
            return {}
        price, back = max(0, int(txn["amount"])), refunded(txn)
        reversed_ = credit_reversed(added, price, back)
        return {wallet_account(txn["customer_id"]): added - reversed_, CLEARING: back - price,
                DISCOUNTS: price - added + reversed_ - back}
    if txn["kind"] in WALLET_KINDS:
        if not txn.get("customer_id") or taken <= 0:
            return {}
        return {wallet_account(txn["customer_id"]): taken - refunded(txn), CLEARING: refunded(txn) - taken}
    if taken <= 0:
        return {}
    out = {REVENUE: taken - refunded(txn) + put_back, CLEARING: refunded(txn) - taken - put_back, DISPUTED: 0}
    dispute = withdrawn_dispute(txn)
    if dispute:
        _, amount, status = dispute
        if status != "won":
            out[CLEARING] += amount
        if status == "lost":
            out[REVENUE] -= amount
        elif status != "won":
            out[DISPUTED] -= amount
    return out


async def check(conn: asyncpg.Connection | asyncpg.Pool, *, transaction: str | None = None,
                customer: str | None = None, since: datetime | None = None) -> AsyncIterator[dict[str, Any]]:
    """Every problem found, one dict each: a group that does not balance, or a
    transaction whose entries disagree with its status and amounts."""
    where, args = _filters(transaction, customer, since)
    for r in await conn.fetch(
            f"""SELECT e.entry_group, e.currency, sum(e.amount)::bigint AS total
                  FROM ledger_entries e JOIN transactions t ON t.id = e.transaction_id
                 WHERE e.entry_group IN (SELECT e.entry_group FROM ledger_entries e
                                           JOIN transactions t ON t.id = e.transaction_id WHERE {where})
                 GROUP BY 1, 2 HAVING sum(e.amount) <> 0""", *args):
        yield {"problem": "unbalanced_group", "entry_group": r["entry_group"], "currency": r["currency"],
               "sum": r["total"]}
    # The transactions in scope: those with entries the filters select, and those the
    # filters name (touched since --since), so money with no entry at all is found too.
    named, named_args = _transaction_filters(transaction, customer, since, first=len(args) + 1)
    rows = await conn.fetch(
        f"""SELECT t.id, t.kind, t.status, t.amount, t.currency, t.customer_id, t.amount_refunded, t.dispute,
                   t.last_error, t.details,
                   (SELECT coalesce(jsonb_object_agg(account, total), '{{}}') FROM
                      (SELECT account, sum(amount)::bigint AS total FROM ledger_entries x
                        WHERE x.transaction_id = t.id GROUP BY account) s) AS moved,
                   (SELECT coalesce(sum(amount), 0)::bigint FROM ledger_entries x
                     WHERE x.transaction_id = t.id AND starts_with(x.entry_group, 'refund_failed:')
                       AND x.account IN ('{REVENUE}', 'wallet:' || t.customer_id)) AS put_back,
                   (SELECT coalesce(-sum(amount), 0)::bigint FROM ledger_entries x
                     WHERE x.transaction_id = t.id AND starts_with(x.entry_group, 'refund:' || t.id || ':')
                       AND x.account IN ('{REVENUE}', 'wallet:' || t.customer_id)) AS refunds
              FROM transactions t
             WHERE t.id IN (SELECT e.transaction_id FROM ledger_entries e JOIN transactions t
                              ON t.id = e.transaction_id WHERE {where})
                OR ({named})
             ORDER BY t.id""", *args, *named_args)
    for row in rows:
        txn = {**dict(row), "dispute": _json(row["dispute"]), "last_error": _json(row["last_error"]),
               "amount_added": (_json(row["details"]) or {}).get("amount_added")}
        moved = {k: v for k, v in _json(row["moved"]).items() if v}
        want = {k: v for k, v in expected(txn, row["put_back"]).items() if v}
        wallet_caps = credits_wallet(txn) and (withdrawn_dispute(txn) or row["put_back"])
        if not wallet_caps and moved != want:
            yield {"problem": "transaction_disagrees", "transaction_id": row["id"], "status": row["status"],
                   "amount": row["amount"], "amount_refunded": row["amount_refunded"], "expected": want,
                   "posted": moved}
        elif wallet_caps and not 0 <= moved.get(wallet_account(txn["customer_id"]), 0) <= (
                amount_added(txn) or captured(txn)):
            yield {"problem": "wallet_out_of_bounds", "transaction_id": row["id"], "posted": moved}
        elif not wallet_caps and amount_added(txn) is None and row["refunds"] != refunded(txn):
            yield {"problem": "refunds_disagree", "transaction_id": row["id"],
                   "amount_refunded": row["amount_refunded"], "posted_refunds": row["refunds"]}


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value
