"""Every change to a transaction goes through here, inside the caller's database
transaction: find the transaction an event speaks for, decide, move, run the effects
(paystream.effects), log and NOTIFY.  Webhooks, the outbox and the sweeper all use it."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from paystream import effects
from paystream.changes import follows, reads, refunds, store
from paystream.changes.lifecycle import REFUNDABLE, Change, State, machine_for
from paystream.ingest.stripe_events import Meaning, event_time, interpret
from paystream.ops import metrics

log = logging.getLogger("paystream.transitions")


def _validates(kind: str, status: str) -> bool:
    return kind == "card_validation" and status in ("requires_capture", "succeeded")


_TICK = timedelta(microseconds=1)


def next_row(row: asyncpg.Record | dict[str, Any], move: Change) -> dict[str, Any]:
    """The row after `move`: what move_and_log writes, and what effects and the log see."""
    return {
        **dict(row.items()),
        "status": move.status,
        "last_error": move.last_error,
        "validated": row["validated"] or _validates(row["kind"], move.status),
        "status_at": max(move.at, row["status_at"]) if row["status_at"] else move.at,
        "amount_refunded": max(row["amount_refunded"], move.amount_refunded or 0),
        "dispute": move.dispute if move.dispute is not None else row["dispute"],
        "details": move.details if move.details is not None else row.get("details"),
        "seq": row["seq"] + 1,
        # Our clock, not the database's, so the pushed JSON is written with the row; never
        # behind the row's last change (the row is locked: no one else moves it meanwhile).
        "updated_at": max(datetime.now(UTC), row["updated_at"] + _TICK),
    }


async def apply(conn: asyncpg.Connection, row: asyncpg.Record | dict[str, Any], change: Change, *,
                stripe_event_id: str | None, cause_type: str,
                finish_event: bool = False) -> tuple[bool, asyncpg.Record | dict[str, Any]]:
    """Apply one change to a locked transaction row; True if anything visible changed.
    With finish_event, the last move also records stripe_event_id as applied."""
    decision = machine_for(row["kind"]).decide(
        State(row["status"], row["status_at"], row["last_error"], row["amount_refunded"], row["dispute"],
              row.get("details")), change)
    if decision.reread:
        await reads.queue(conn, row["id"])
    taken = _partly_captured(row, change)
    if taken is not None and any(move.status in REFUNDABLE for move in decision.moves):
        # A partial capture (here or in the Dashboard): the transaction's amount becomes
        # what was taken before the move that takes it, so the ledger, the wallet and
        # every refund are bounded by what the customer paid, not what was authorised.
        await conn.execute("UPDATE transactions SET amount = $2 WHERE id = $1", row["id"], taken)
        row = {**dict(row.items()), "amount": taken}
    if decision.touch:
        await store.touch_transaction(conn, row["id"], change.at)
    for k, move in enumerate(decision.moves):
        moved = next_row(row, move)
        data = await _with_effects(conn, moved, row["status"], stripe_event_id, cause_type)
        await store.move_and_log(conn, moved, previous_status=row["status"], stripe_event_id=stripe_event_id,
                                 event_type=cause_type, data=data,
                                 finish_event=finish_event and k == len(decision.moves) - 1)
        row = moved
    if decision.moves:
        await reads.after_move(conn, row)
    if decision.moves and row["status"] in follows.FOLLOWED_STATUSES:
        await follows.propagate(conn, row, apply, stripe_event_id=stripe_event_id, cause_type=cause_type)
    return bool(decision.moves), row


# Kinds whose amount is their PaymentIntent's, so a partial capture lowers it (an
# invoice's is what it asked; a Checkout Session's money is its PaymentIntent's).
_CAPTURED_KINDS = frozenset({"payment", "wallet_top_up"})


def _partly_captured(row: asyncpg.Record | dict[str, Any], change: Change) -> int | None:
    """What a capture of less than the amount took, when `change` reports one for a
    transaction whose money was not taken yet; else None."""
    taken = change.amount_captured
    if taken is None or row["kind"] not in _CAPTURED_KINDS or row["status"] in REFUNDABLE:
        return None
    return taken if 0 < taken < row["amount"] else None


async def create(conn: asyncpg.Connection, *, stripe_id: str | None, kind: str, amount: int,
                 currency: str, customer_id: str | None, metadata: dict[str, Any],
                 change: Change, stripe_event_id: str | None, cause_type: str,
                 txn_id: str | None = None) -> asyncpg.Record | None:
    """A new transaction at seq 1, with its side effects; None if its stripe_id exists."""
    row = await store.insert_transaction(
        conn, stripe_id=stripe_id, kind=kind, status=change.status, amount=amount, currency=currency,
        customer_id=customer_id, metadata=metadata, last_error=change.last_error,
        validated=_validates(kind, change.status), status_at=change.at,
        amount_refunded=change.amount_refunded or 0, dispute=change.dispute, txn_id=txn_id,
        details=change.details)
    if row is not None:
        await reads.after_move(conn, row)
        data = await _with_effects(conn, row, None, stripe_event_id, cause_type)
        await store.append_event(conn, row, previous_status=None, stripe_event_id=stripe_event_id,
                                 event_type=cause_type, data=data)
    return row


async def _with_effects(conn: asyncpg.Connection, row: asyncpg.Record | dict[str, Any],
                        previous_status: str | None, stripe_event_id: str | None,
                        cause_type: str) -> dict[str, Any]:
    """The pushed event of the row about to be logged, after every effect has run on it
    (in this database transaction: exactly once per logged event) and added its fields."""
    data = store.pushed_event(row, previous_status, stripe_event_id, cause_type)
    extra = await effects.active().run(conn, data, previous_status)
    return {**data, **{k: v for k, v in extra.items() if k not in data}}  # never overwrite the contract's fields


async def lock_for_writing(conn: asyncpg.Connection, txn_id: str) -> None:
    """Serialise writing a transaction's row with parking events for it (see route_event)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", txn_id)


async def route_event(conn: asyncpg.Connection, event: dict[str, Any], meaning: Meaning | None = None,
                      locked: asyncpg.Record | None = None) -> tuple[str, str | None, bool]:
    """Find (or create) the transaction a stored event speaks for and apply it.
    `meaning` and `locked` (its stripe_id's row, already locked) spare the webhook's hot
    path a repeat; the third value says the event row was already marked applied."""
    meaning = meaning or interpret(event)
    routed = await _route(conn, event, meaning, locked)
    if meaning.follows and routed[1] is not None and routed[0] != "parked":
        await follows.record(conn, routed[1], meaning.follows, apply, stripe_event_id=event["id"],
                             cause_type=event["type"])
    return routed


async def _route(conn: asyncpg.Connection, event: dict[str, Any], meaning: Meaning,
                 locked: asyncpg.Record | None) -> tuple[str, str | None, bool]:
    if meaning.stripe_id is None:
        return "unrouted", None, False
    row = locked or await store.lock_by_stripe_id(conn, meaning.stripe_id) or await store.lock_by_link(
        conn, meaning.stripe_id)
    if row is None and meaning.transaction_ref:
        row = await _by_reference(conn, event, meaning)
        if row is None:
            return "parked", meaning.transaction_ref, False
    if row is None:
        if meaning.change is None:
            return "unrouted", None, False  # nothing to create a transaction from; kept for operators
        taken = meaning.change.amount_captured if meaning.kind in _CAPTURED_KINDS else None
        amount = taken if taken is not None and 0 < taken < meaning.amount else meaning.amount
        row = await create(conn, stripe_id=meaning.stripe_id, kind=meaning.kind, amount=amount,
                           currency=meaning.currency, customer_id=meaning.customer_id,
                           metadata=meaning.metadata, change=meaning.change,
                           stripe_event_id=event["id"], cause_type=event["type"])
        if row is not None:
            for stripe_id in meaning.links:
                await store.link(conn, stripe_id, row["id"])
            return "applied", row["id"], False
        # Another delivery created it a moment ago: take its lock and apply on top.
        row = await store.lock_by_stripe_id(conn, meaning.stripe_id)
        assert row is not None
    for stripe_id in meaning.links:
        if stripe_id != row["stripe_id"]:
            await store.link(conn, stripe_id, row["id"])
    if meaning.change is None and not meaning.refunds:
        return "no_change", row["id"], False
    if meaning.change is not None:
        problem = _beyond_paid(row, meaning.change)
        if problem is not None:
            raise Invalid(problem)
    change, listing = meaning.change, None
    if meaning.refunds and await refunds.adopt(conn, row, meaning.refunds):
        # The refunds it carries, recorded, and listed in the transaction's JSON by the
        # same move as the event's own change (one event, one logged move).
        listing = await refunds.change_for(conn, row, event_time(event))
        change = listing if change is None else replace(
            change, details={**(change.details or {}), "refunds": (listing.details or {})["refunds"]})
    if change is None:
        return "no_change", row["id"], False  # refunds it carries were recorded already
    moved, row = await apply(conn, row, change, stripe_event_id=event["id"], cause_type=event["type"],
                             finish_event=True)
    if listing is not None and change is not listing and not moved:
        moved, row = await apply(conn, row, listing, stripe_event_id=event["id"], cause_type=event["type"],
                                 finish_event=True)
    return ("applied" if moved else "no_change"), row["id"], moved


class Invalid(Exception):
    """An authentic event that contradicts the transaction it names (a refund or dispute
    of more than was paid): kept with outcome `invalid`, applied to nothing."""


def _beyond_paid(row: asyncpg.Record | dict[str, Any], change: Change) -> str | None:
    paid = _partly_captured(row, change) or row["amount"]  # what this change says was taken
    if change.amount_refunded is not None and change.amount_refunded > paid:
        return f"a refund of {change.amount_refunded} on {row['id']}, which was paid {paid}"
    disputed = int((change.dispute or {}).get("amount") or 0)
    if disputed > paid:
        return f"a dispute of {disputed} on {row['id']}, which was paid {paid}"
    return None


class Mismatched(Exception):
    """A Stripe object names one of our transactions in its metadata but is not the
    object that transaction was created for: linking it could credit the wrong account."""


def _mismatch(row: asyncpg.Record, meaning: Meaning) -> str | None:
    """Why `meaning`'s Stripe object may not be linked to `row`, or None if it matches:
    the transaction has no other object of its own, and currency, customer (where both
    are set) and, for the object itself, amount agree.  (An invoice's amount may differ
    from ours by its discount, so only its currency and customer are compared.)"""
    named = f"{meaning.stripe_id} names {row['id']} in its metadata"
    if row["stripe_id"] is not None and row["stripe_id"] != meaning.stripe_id:
        return f"{named}, which is linked to {row['stripe_id']}"
    if meaning.currency != "xxx" and meaning.currency != row["currency"]:
        return f"{named}, but its currency is {meaning.currency}, not {row['currency']}"
    if meaning.customer_id and row["customer_id"] and meaning.customer_id != row["customer_id"]:
        return f"{named}, but its customer is {meaning.customer_id}, not {row['customer_id']}"
    if meaning.target_amount and row["kind"] != "invoice" and meaning.amount != row["amount"]:
        return f"{named}, but its amount is {meaning.amount}, not {row['amount']}"
    return None


async def _by_reference(conn: asyncpg.Connection, event: dict[str, Any], meaning: Meaning) -> asyncpg.Record | None:
    """The Stripe object names our transaction in its metadata but is not linked yet (our
    create call has not stored Stripe's answer).  Link it; or, if the row itself is not
    written yet, park the event: the transaction that writes the row applies it."""
    ref = meaning.transaction_ref
    assert ref is not None
    await lock_for_writing(conn, ref)
    row = await store.lock_by_id(conn, ref)
    if row is None:
        await conn.execute(
            "INSERT INTO parked_events (stripe_event_id, transaction_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            event["id"], ref)
        return None
    problem = _mismatch(row, meaning)
    if problem is not None:
        raise Mismatched(problem)
    if row["stripe_id"] is None:
        await store.set_stripe_id(conn, row["id"], meaning.stripe_id)
        row = await store.lock_by_id(conn, row["id"])
    elif row["stripe_id"] != meaning.stripe_id:
        await store.link(conn, meaning.stripe_id, row["id"])
    return row


async def apply_stored_event(conn: asyncpg.Connection, event: dict[str, Any], meaning: Meaning | None = None,
                             locked: asyncpg.Record | None = None) -> tuple[str, str | None]:
    """Route an event already in stripe_events and record its outcome there."""
    try:
        outcome, txn_id, finished = await route_event(conn, event, meaning, locked)
    except Invalid as exc:
        log.warning("event not applied: %s", exc, extra={"stripe_event_id": event["id"], "event_type": event["type"]})
        metrics.INVALID.inc()
        await store.finish_stripe_event(conn, event["id"], outcome="invalid", error=str(exc)[:2000], processed=False)
        return "invalid", None
    except Mismatched as exc:
        # Kept, answered, applied to nothing: an operator decides (`paystream events mismatched`).
        log.warning("event not linked: %s", exc, extra={"stripe_event_id": event["id"], "event_type": event["type"]})
        metrics.MISMATCHED.inc()
        await store.finish_stripe_event(conn, event["id"], outcome="mismatched", error=str(exc)[:2000])
        return "mismatched", None
    if not finished:
        parked = outcome == "parked"  # txn_id names a row not written yet: no link
        await store.finish_stripe_event(conn, event["id"], outcome=outcome,
                                        transaction_id=None if parked else txn_id, processed=not parked)
    return outcome, txn_id


async def unpark(conn: asyncpg.Connection, txn_id: str) -> int:
    """Apply, in the caller's database transaction, every event parked for txn_id."""
    parked = await conn.fetch(
        """SELECT s.id, s.raw_body FROM parked_events p JOIN stripe_events s ON s.id = p.stripe_event_id
            WHERE p.transaction_id = $1 ORDER BY s.created, s.received_at FOR UPDATE OF p""", txn_id)
    for record in parked:
        await conn.execute("DELETE FROM parked_events WHERE stripe_event_id = $1", record["id"])
        await apply_stored_event(conn, json.loads(record["raw_body"]))
        log.info("applied parked event", extra={"stripe_event_id": record["id"], "transaction_id": txn_id})
    return len(parked)
