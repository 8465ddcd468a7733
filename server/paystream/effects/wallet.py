"""Built-in effect: the wallet ledger.  A wallet top-up that succeeds credits the
customer's wallet; a refund reverses the refunded part; a dispute reverses the disputed
part while it holds the funds, and posts it back if won.  Double entry: every group of
entries sums to zero (the schema checks it at commit), and each group's key is unique, so
no replay or reorder can post it twice.

An invoice made by POST /v1/transactions (the coupon flow) is a top-up too: paid, it
adds its `amount_added` (the amount asked for) to the wallet while the customer paid its
`amount` (less the coupon), the difference taken from `merchant:discounts`; a refund
takes back the share of the credit that the refunded share of the price bought (all of
it for a full refund), never more than the invoice still credits."""

from __future__ import annotations

import json
import logging
from typing import Any

import asyncpg

from paystream.changes.lifecycle import DISPUTE_FUNDS_WITHDRAWN, REFUNDABLE

log = logging.getLogger("paystream.effects.wallet")

CLEARING = "stripe:clearing"
DISCOUNTS = "merchant:discounts"  # what coupons gave: credit added beyond the price paid


def amount_added(txn: dict[str, Any]) -> int | None:
    """What a paid invoice adds to its customer's wallet: its `amount_added`, set on
    invoices made by POST /v1/transactions; None for any other transaction (a
    subscription's invoice, one adopted from Stripe, a payment)."""
    value = txn.get("amount_added") if txn["kind"] == "invoice" else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def credits_wallet(txn: dict[str, Any]) -> bool:
    """Its money is the customer's (a wallet top-up, an invoice that adds to the wallet),
    posted by this effect rather than to the merchant's revenue."""
    return txn["kind"] == "wallet_top_up" or amount_added(txn) is not None


def credit_reversed(added: int, price: int, refunded: int) -> int:
    """The part of `added` a refund of `refunded` out of `price` takes back: the same share,
    rounded down, and all of it once the whole price is refunded."""
    if price <= 0 or refunded <= 0:
        return 0
    return added if refunded >= price else added * refunded // price


def wallet_account(customer_id: str) -> str:
    return f"wallet:{customer_id}"


async def wallet_balance(conn: asyncpg.Connection, customer_id: str) -> int:
    return await conn.fetchval(
        "SELECT coalesce(sum(amount), 0)::bigint FROM ledger_entries WHERE account = $1",
        wallet_account(customer_id))


async def _post(conn: asyncpg.Connection, group: str, txn: dict[str, Any], wallet_amount: int) -> bool:
    """A balanced pair: the wallet moves by wallet_amount, clearing by its opposite."""
    inserted = await conn.fetchval(
        """WITH rows AS (
             INSERT INTO ledger_entries (entry_group, transaction_id, account, amount, currency)
             VALUES ($1, $2, $3, $4, $5), ($1, $2, $6, -$4::bigint, $5)
             ON CONFLICT (entry_group, account) DO NOTHING RETURNING 1)
           SELECT count(*) FROM rows""",
        group, txn["id"], wallet_account(txn["customer_id"]), wallet_amount, txn["currency"], CLEARING)
    return inserted > 0


async def _posted(conn: asyncpg.Connection, txn: dict[str, Any], prefix: str) -> int:
    """What this transaction's groups starting with `prefix` moved the wallet by so far."""
    return await conn.fetchval(
        """SELECT coalesce(sum(amount), 0)::bigint FROM ledger_entries
            WHERE transaction_id = $1 AND account = $2 AND starts_with(entry_group, $3)""",
        txn["id"], wallet_account(txn["customer_id"]), prefix)


async def _dispute(conn: asyncpg.Connection, txn: dict[str, Any]) -> None:
    """A dispute that withdrew the funds reverses the disputed part of the credit, never
    more than this transaction still credits; one closed as won posts back exactly what
    its withdrawal took.  Each is a group keyed by the dispute, so duplicates and any
    order (won seen before, or without, the withdrawal) post each once."""
    dispute = txn.get("dispute")
    if not dispute or dispute.get("status") not in DISPUTE_FUNDS_WITHDRAWN:
        return
    withdrawal = f"dispute:{txn['id']}:{dispute['id']}"
    amount = min(int(dispute.get("amount") or 0), txn["amount"], await _posted(conn, txn, ""))
    if amount > 0:
        await _post(conn, withdrawal, txn, -amount)
    if dispute["status"] == "won":
        taken = -await _posted(conn, txn, withdrawal)
        if taken > 0:
            await _post(conn, f"dispute_won:{txn['id']}:{dispute['id']}", txn, taken)


async def _post_legs(conn: asyncpg.Connection, group: str, txn: dict[str, Any], legs: list[tuple[str, int]]) -> None:
    """One balanced group of any number of legs (none of zero); nothing if posted already."""
    legs = [(account, amount) for account, amount in legs if amount]
    if legs:
        await conn.execute(
            """INSERT INTO ledger_entries (entry_group, transaction_id, account, amount, currency)
               SELECT $1, $2, account, amount, $5 FROM unnest($3::text[], $4::bigint[]) AS l (account, amount)
               ON CONFLICT (entry_group, account) DO NOTHING""",
            group, txn["id"], [a for a, _ in legs], [m for _, m in legs], txn["currency"])


async def _invoice(conn: asyncpg.Connection, txn: dict[str, Any], added: int) -> None:
    """A paid invoice of the coupon flow: the wallet gains `added`, clearing the price
    paid, discounts the difference (`topup:<txn>`, once); each refund total reverses its
    share of the credit (`refund:<txn>:<total refunded>`), capped by what is still credited."""
    wallet, price = wallet_account(txn["customer_id"]), max(0, int(txn["amount"]))
    await _post_legs(conn, f"topup:{txn['id']}", txn, [(wallet, added), (CLEARING, -price), (DISCOUNTS, price - added)])
    await _dispute(conn, txn)
    refunded = min(int(txn.get("amount_refunded") or 0), price)
    prefix = f"refund:{txn['id']}:"
    reversed_so_far = -await _posted(conn, txn, prefix)
    money_so_far = await conn.fetchval(
        """SELECT coalesce(sum(amount), 0)::bigint FROM ledger_entries
            WHERE transaction_id = $1 AND account = $2 AND starts_with(entry_group, $3)""", txn["id"], CLEARING, prefix)
    reverse = min(credit_reversed(added, price, refunded) - reversed_so_far, await _posted(conn, txn, ""))
    money = refunded - money_so_far
    if reverse > 0 or money > 0:
        reverse = max(reverse, 0)
        await _post_legs(conn, f"{prefix}{refunded}", txn, [(wallet, -reverse), (CLEARING, money), (DISCOUNTS, reverse - money)])


async def failed_refund(conn: asyncpg.Connection, txn: dict[str, Any]) -> tuple[str, int] | None:
    """(refund id, amount) of the failed refund this event reports, if it does.

    The transaction's JSON names the refund (`last_error.refund`); its amount is
    `last_error.amount` when given, else the refund object of the Stripe event that
    reported the failure (stored with every event), else the refund as listed in the
    transaction's `refunds`.  The seam for a refunds table: give the amount in either."""
    error = txn.get("last_error") or {}
    if error.get("code") != "refund_failed" or not isinstance(error.get("refund"), str):
        return None
    refund_id = error["refund"]
    amount = error.get("amount")
    if not isinstance(amount, int):
        amount = next((r.get("amount") for r in txn.get("refunds") or []
                       if isinstance(r, dict) and refund_id in (r.get("id"), r.get("stripe_id"))), None)
    if not isinstance(amount, int):
        raw = await conn.fetchval(
            """SELECT raw_body FROM stripe_events WHERE object_id = $1
                ORDER BY created DESC NULLS LAST, received_at DESC LIMIT 1""", refund_id)
        if raw is not None:
            found = ((json.loads(raw).get("data") or {}).get("object") or {}).get("amount")
            amount = found if isinstance(found, int) else None
    if not isinstance(amount, int) or amount <= 0:
        log.warning("a failed refund of unknown amount: nothing put back",
                    extra={"transaction_id": txn["id"], "refund": refund_id})
        return None
    return refund_id, amount


async def failed_refunds(conn: asyncpg.Connection, txn: dict[str, Any]) -> list[tuple[str, int]]:
    """Every failed refund of the transaction: the one this event reports (last_error),
    and each the transaction's `refunds` lists as failed (a later event clears
    last_error; the list keeps them, so a put-back never depends on which of a refund's
    failure and its charge.refunded arrived first).  Keyed by Stripe's re_ id."""
    found: dict[str, int] = {}
    reported = await failed_refund(conn, txn)
    if reported:
        found[reported[0]] = reported[1]
    for refund in txn.get("refunds") or []:
        if isinstance(refund, dict) and refund.get("status") == "failed":
            key = refund.get("stripe_id") or refund.get("id")
            amount = refund.get("amount")
            if isinstance(key, str) and isinstance(amount, int) and amount > 0:
                found.setdefault(key, amount)
    return sorted(found.items())


async def _put_back_failed(conn: asyncpg.Connection, txn: dict[str, Any], customer: str) -> None:
    """A failed refund gives the wallet back what that refund took from it: never more
    than the wallet's refund reversals not yet put back (a reversal is capped by what the
    transaction still credits, so it may have taken less).  Run after the reversals, on
    every move: the failure may have been seen before the charge.refunded that counted it."""
    wallet = wallet_account(customer)
    for refund_id, failed_amount in await failed_refunds(conn, txn):
        reversed_ = -await _sum_group(conn, txn, wallet, f"refund:{txn['id']}:")
        put_back = await _sum_group(conn, txn, wallet, f"refund_failed:{txn['id']}:")
        amount = min(failed_amount, reversed_ - put_back)
        if amount > 0:
            await _post_legs(conn, f"refund_failed:{txn['id']}:{refund_id}", txn, [(wallet, amount), (CLEARING, -amount)])


async def _sum_group(conn: asyncpg.Connection, txn: dict[str, Any], account: str, prefix: str) -> int:
    return await conn.fetchval(
        """SELECT coalesce(sum(amount), 0)::bigint FROM ledger_entries
            WHERE transaction_id = $1 AND account = $2 AND starts_with(entry_group, $3)""",
        txn["id"], account, prefix)


class WalletLedger:
    name = "wallet"

    async def on_status(self, conn: asyncpg.Connection, transaction: dict[str, Any],
                        previous_status: str | None) -> dict[str, Any] | None:
        added = amount_added(transaction)
        if added is not None and transaction["customer_id"]:
            if transaction["status"] in REFUNDABLE:
                await _invoice(conn, transaction, added)
                await _put_back_failed(conn, transaction, transaction["customer_id"])
            return {"balance": {"customer_id": transaction["customer_id"],
                                "amount": await wallet_balance(conn, transaction["customer_id"]),
                                "currency": transaction["currency"]}}
        if transaction["kind"] != "wallet_top_up":
            return None
        customer = transaction["customer_id"]
        if not customer:
            log.warning("wallet top-up without a customer: nothing credited",
                        extra={"transaction_id": transaction["id"]})
            return None
        if transaction["status"] in REFUNDABLE and transaction["amount"] > 0:
            await _post(conn, f"topup:{transaction['id']}", transaction, transaction["amount"])
            # The dispute first: one won posts its withdrawal back, which a refund after it
            # may then reverse.
            await _dispute(conn, transaction)
            # A refund reverses the refunded part, keyed by Stripe's running total so the
            # same refund reported twice reverses once; what is reversed already is read
            # from the ledger itself, not from the event before this one.  Never more than
            # this transaction still credits: a wallet does not go below zero because a
            # dispute already took the money back.
            reversed_so_far = -await _posted(conn, transaction, f"refund:{transaction['id']}:")
            refunded = min(transaction["amount_refunded"], transaction["amount"])
            reverse = min(refunded - reversed_so_far, await _posted(conn, transaction, ""))
            if reverse > 0:  # keyed by the running total reversed, so a capped reversal can be completed later
                await _post(conn, f"refund:{transaction['id']}:{reversed_so_far + reverse}", transaction, -reverse)
            await _put_back_failed(conn, transaction, customer)
        return {"balance": {"customer_id": customer, "amount": await wallet_balance(conn, customer),
                            "currency": transaction["currency"]}}


effect = WalletLedger()
