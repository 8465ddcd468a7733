"""The write path's SQL: storing Stripe events, creating, locking and moving
transactions, the append-only log with its NOTIFY, and reading the log back to resume;
and the contract's transaction JSON.  (Effects, payments and recovery keep their own
statements beside their code.)"""

from __future__ import annotations

import json
from collections.abc import Iterable
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from ulid import ULID

from paystream.ingest import checkout

CHANNEL = "paystream"

TXN_COLUMNS = (
    "id, stripe_id, kind, status, amount, currency, customer_id, metadata, last_error,"
    " validated, seq, status_at, updated_at, amount_refunded, dispute, details, authorization_days"
)

# Each kind's own fields of the transaction JSON, kept in the row's `details`.
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "subscription": ("current_period_end", "cancel_at_period_end", "trial_end", "next_payment_attempt"),
    # amount_added: what an invoice made by POST /v1/transactions adds to its customer's
    # wallet once paid (effects/wallet.py); null on other invoices (a subscription's).
    "invoice": ("subscription_id", "amount_added"),
}


def new_transaction_id() -> str:
    return f"txn_{ULID()}"


async def init_connection(conn: asyncpg.Connection) -> None:
    # jsonb columns come back as Python objects; the event log is read as ::text instead,
    # so pushed events go out exactly as stored without a decode/encode round.
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


def timestamp(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _authorization_expires_at(row: asyncpg.Record | dict[str, Any]) -> str | None:
    """When the recovery sweeper releases a held authorisation (requires_capture since
    updated_at, for its authorization_days, 7 when it names none); None when not held."""
    if row["status"] != "requires_capture":
        return None
    days = row.get("authorization_days") or 7
    return timestamp(row["updated_at"] + timedelta(days=days))


def render(row: asyncpg.Record | dict[str, Any]) -> dict[str, Any]:
    """The contract's transaction JSON."""
    data = {
        "id": row["id"],
        "stripe_id": row["stripe_id"],
        "kind": row["kind"],
        "status": row["status"],
        "amount": row["amount"],
        "currency": row["currency"],
        "customer_id": row["customer_id"],
        "metadata": row["metadata"],
        "last_error": row["last_error"],
        "validated": row["validated"],
        "amount_refunded": row["amount_refunded"],
        "dispute": row["dispute"],
        # Every refund of it, made through paystream or adopted (changes/refunds.py).
        "refunds": (row.get("details") or {}).get("refunds") or [],
        "seq": row["seq"],
        "updated_at": timestamp(row["updated_at"]),
        "authorization_expires_at": _authorization_expires_at(row),
    }
    if row["kind"] == "checkout":
        data.update(checkout.session_fields(row["status"], row["last_error"], row["amount"]))
    fields = KIND_FIELDS.get(row["kind"])
    if fields:
        details = row.get("details") or {}
        data.update({name: details.get(name) for name in fields})
    return data


# --- stripe_events -------------------------------------------------------------------


# One row per evt_ id across stripe_events' partitions (migration 017): a repeat counts an
# attempt; an event not applied yet takes the body that came now, so the stored event is
# always what was applied (a parked one keeps the body its transaction will apply).
_STORE_EVENT = """SELECT processed_at, outcome
    FROM paystream_store_event($1, $2, $3, $4, $5, to_timestamp($6), $7, $8, $10)"""

# stripe_events is partitioned by received_at (migration 017), and its id alone prunes no
# partition.  An event is first received after Stripe created it, give or take the clocks'
# skew: every row of an evt_ id has received_at >= its `created` less a day.  That floor,
# passed as a value, lets the planner read (and lock) only the partitions since then, about
# two for a fresh event, however many retention keeps.  The task that stored an event
# keeps its floor here for the statements that finish it; any other id gets NO_FLOOR
# (every partition: correct, only slower).
NO_FLOOR = datetime(1970, 1, 1, tzinfo=UTC)
_SKEW = timedelta(days=1)
_event_floor: ContextVar[tuple[str, datetime] | None] = ContextVar("paystream_event_floor", default=None)


def event_floor(event_id: str | None) -> datetime:
    known = _event_floor.get()
    return known[1] if known is not None and known[0] == event_id else NO_FLOOR


def _remember_floor(event: dict[str, Any]) -> datetime:
    created = event.get("created")
    floor = NO_FLOOR
    if isinstance(created, int) and not isinstance(created, bool):
        try:
            floor = max(NO_FLOOR, min(datetime.fromtimestamp(created, UTC), datetime.now(UTC)) - _SKEW)
        except (OverflowError, OSError, ValueError):
            floor = NO_FLOOR
    _event_floor.set((event["id"], floor))
    return floor


def _event_args(event: dict[str, Any], raw_body: str, headers: dict[str, str]) -> tuple[Any, ...]:
    obj = event["data"]["object"]
    return (
        event["id"],
        event["type"],
        obj.get("id"),
        event.get("api_version") if isinstance(event.get("api_version"), str) else None,
        event.get("livemode") if isinstance(event.get("livemode"), bool) else None,
        event["created"],
        raw_body,
        headers,
    )


async def record_stripe_event(
    conn: asyncpg.Connection, event: dict[str, Any], raw_body: str, headers: dict[str, str]
) -> asyncpg.Record:
    """Store a verified delivery (or count a repeat) and lock its row until commit.

    Concurrent deliveries of one event queue on its id's advisory lock (held to commit): the
    second sees the first's processed_at once it commits, so an event is applied once
    however many arrive.
    """
    floor = _remember_floor(event)
    return await conn.fetchrow(_STORE_EVENT.replace("$10", "$9"), *_event_args(event, raw_body, headers), floor)


async def record_and_lock(
    conn: asyncpg.Connection, event: dict[str, Any], raw_body: str, headers: dict[str, str],
    stripe_id: str | None,
) -> tuple[asyncpg.Record, asyncpg.Record | None]:
    """record_stripe_event, and the transaction of stripe_id locked, in one round trip.

    The webhook's hot path: the lock is taken after the event row's (as when they were
    two statements), and FOR UPDATE returns the row's newest committed version even
    though the statement's snapshot predates a wait on either lock.  The transaction row
    is None when stripe_id names none (the caller then looks further)."""
    rec = await conn.fetchrow(
        f"""WITH stored AS ({_STORE_EVENT})
            SELECT stored.processed_at AS event_processed_at, stored.outcome AS event_outcome, t.*
              FROM stored LEFT JOIN LATERAL (
                     SELECT {TXN_COLUMNS} FROM transactions WHERE stripe_id = $9 FOR UPDATE) t ON true""",
        *_event_args(event, raw_body, headers), stripe_id, _remember_floor(event))
    stored = {"processed_at": rec["event_processed_at"], "outcome": rec["event_outcome"]}
    return stored, (rec if rec["id"] is not None else None)  # type: ignore[return-value]


async def finish_stripe_event(
    conn: asyncpg.Connection,
    event_id: str,
    *,
    outcome: str,
    transaction_id: str | None = None,
    error: str | None = None,
    processed: bool = True,
) -> None:
    await conn.execute(
        """UPDATE stripe_events
              SET processed_at = CASE WHEN $5 THEN clock_timestamp() END,
                  outcome = $2, transaction_id = $3, error = $4
            WHERE id = $1 AND received_at >= $6""",
        event_id,
        outcome,
        transaction_id,
        error,
        processed,
        event_floor(event_id),
    )


# --- transactions --------------------------------------------------------------------


async def lock_by_stripe_id(conn: asyncpg.Connection, stripe_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {TXN_COLUMNS} FROM transactions WHERE stripe_id = $1 FOR UPDATE", stripe_id
    )


async def insert_transaction(
    conn: asyncpg.Connection,
    *,
    stripe_id: str | None,
    kind: str,
    status: str,
    amount: int,
    currency: str,
    customer_id: str | None,
    metadata: dict[str, Any],
    last_error: dict[str, Any] | None = None,
    validated: bool = False,
    status_at: datetime | None = None,
    amount_refunded: int = 0,
    dispute: dict[str, Any] | None = None,
    txn_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> asyncpg.Record | None:
    """Create a transaction at seq 1; None if another request created its stripe_id first."""
    return await conn.fetchrow(
        f"""INSERT INTO transactions (id, stripe_id, kind, status, amount, currency, customer_id,
                                      metadata, last_error, validated, seq, status_at, amount_refunded,
                                      dispute, details)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 1, $11, $12, $13, $14)
            ON CONFLICT (stripe_id) DO NOTHING
            RETURNING {TXN_COLUMNS}""",
        txn_id or new_transaction_id(),
        stripe_id,
        kind,
        status,
        amount,
        currency,
        customer_id,
        metadata,
        last_error,
        validated,
        status_at,
        amount_refunded,
        dispute,
        details,
    )


async def lock_by_id(conn: asyncpg.Connection, txn_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {TXN_COLUMNS} FROM transactions WHERE id = $1 FOR UPDATE", txn_id)


async def lock_by_link(conn: asyncpg.Connection, stripe_id: str) -> asyncpg.Record | None:
    """The transaction a secondary Stripe object (an invoice's PaymentIntent) speaks for."""
    return await conn.fetchrow(
        f"""SELECT {TXN_COLUMNS} FROM transactions
             WHERE id = (SELECT transaction_id FROM transaction_links WHERE stripe_id = $1)
             FOR UPDATE""", stripe_id)


async def link(conn: asyncpg.Connection, stripe_id: str, txn_id: str) -> None:
    await conn.execute(
        "INSERT INTO transaction_links (stripe_id, transaction_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        stripe_id, txn_id)


async def set_stripe_id(conn: asyncpg.Connection, txn_id: str, stripe_id: str) -> None:
    """Link our transaction to the Stripe object just created for it (once)."""
    await conn.execute(
        "UPDATE transactions SET stripe_id = $2 WHERE id = $1 AND stripe_id IS NULL", txn_id, stripe_id)


async def touch_transaction(conn: asyncpg.Connection, txn_id: str, status_at: datetime) -> None:
    """A newer event confirmed the current status: remember its time, change nothing visible."""
    await conn.execute(
        "UPDATE transactions SET status_at = greatest(status_at, $2) WHERE id = $1", txn_id, status_at
    )


def plausible_id(any_id: str) -> bool:
    """Could this be an id we store? (Postgres text holds no NUL; ids are short.)"""
    return 0 < len(any_id) <= 255 and "\x00" not in any_id


async def get_transaction(conn: asyncpg.Connection | asyncpg.Pool, any_id: str) -> asyncpg.Record | None:
    """By our txn_ id or by the linked Stripe object id."""
    if not plausible_id(any_id):
        return None
    column = "id" if any_id.startswith("txn_") else "stripe_id"
    return await conn.fetchrow(f"SELECT {TXN_COLUMNS} FROM transactions WHERE {column} = $1", any_id)


# --- the event log -------------------------------------------------------------------


def pushed_event(row: asyncpg.Record | dict[str, Any], previous_status: str | None,
                 stripe_event_id: str | None, event_type: str | None) -> dict[str, Any]:
    """The contract's pushed event for a logged row: the transaction JSON, previous_status
    and cause (what effects are given, before they add their fields)."""
    data = render(row)
    data["previous_status"] = previous_status
    data["cause"] = {"stripe_event_id": stripe_event_id, "type": event_type}
    return data


def _log_entry(row: asyncpg.Record | dict[str, Any], data: dict[str, Any] | None, previous_status: str | None,
               stripe_event_id: str | None, event_type: str | None) -> tuple[str, str]:
    """The pushed JSON of a log row (`data`, else the bare pushed_event), and the NOTIFY
    payload that announces it."""
    if data is None:
        data = pushed_event(row, previous_status, stripe_event_id, event_type)
    text = json.dumps(data, separators=(",", ":"))
    if broker:
        _note_queued()
        return text, ""
    return text, notify_payload(row["id"], row["seq"], row["status"], text)


# Postgres refuses a NOTIFY payload of 8000 bytes or more; keep a margin below it.
NOTIFY_LIMIT = 7500
# Whether a notification carries the pushed event (when it fits), so that listeners push
# without reading the log (PAYSTREAM_NOTIFY_EVENTS=0: ids only, every listener reads).
notify_events = True
_DATA = ',"data":'


def notify_payload(txn_id: str, seq: int, status: str, text: str) -> str:
    """{"id","seq","status"} and, when it fits, "data": the pushed event itself, last, so a
    listener can take it out as the very bytes that were logged (notified_event)."""
    head = json.dumps({"id": txn_id, "seq": seq, "status": status}, separators=(",", ":"))
    if notify_events and len(head) + len(_DATA) + len(text) <= NOTIFY_LIMIT:
        return f"{head[:-1]}{_DATA}{text}}}"
    return head


# PAYSTREAM_BROKER (set by the app at start-up): a logged event is queued in broker_outbox,
# in the statement that logs it, instead of NOTIFYing; push/listener_nats.py publishes it
# after commit.  The pool asks take_queued() as it takes each connection back.
broker = False
_queued: ContextVar[list[int] | None] = ContextVar("paystream_broker_queued", default=None)


def _note_queued() -> None:
    box = _queued.get()
    if box is None:
        box = [0]
        _queued.set(box)
    box[0] += 1


def take_queued() -> bool:
    """Whether this task has queued events for the broker since it last asked.  Asked as
    the pool takes a connection back (after its commit or rollback; the release runs in a
    copy of the task's context, which holds the same box)."""
    box = _queued.get()
    if not box or not box[0]:
        return False
    box[0] = 0
    return True


def broker_message(txn_id: str, seq: int, status: str, text: str) -> bytes:
    """What the broker carries: the NOTIFY payload's shape, always with the event (a
    broker message may be far larger than a NOTIFY)."""
    head = json.dumps({"id": txn_id, "seq": seq, "status": status}, separators=(",", ":"))
    return f"{head[:-1]}{_DATA}{text}}}".encode()


def notified_event(payload: str) -> tuple[str, int, str | None, str | None]:
    """(id, seq, status, data) of a notification; data None when only a pointer came."""
    note = json.loads(payload)
    txn_id, seq = note["id"], note["seq"]
    if not isinstance(txn_id, str) or not isinstance(seq, int):
        raise ValueError("not a paystream notification")
    if "data" not in note:
        return txn_id, seq, note.get("status"), None
    # The header holds no `,"data":` (ids, a number, a status), so the first one starts data.
    return txn_id, seq, note.get("status"), payload[payload.index(_DATA) + len(_DATA):-1]


async def append_event(
    conn: asyncpg.Connection,
    row: asyncpg.Record,
    *,
    previous_status: str | None,
    stripe_event_id: str | None,
    event_type: str | None,
    data: dict[str, Any] | None = None,
) -> str:
    """Log the transaction's new state at its seq and NOTIFY (with the broker: queue it in
    broker_outbox), in the caller's transaction.

    Postgres delivers the NOTIFY only at commit (and the outbox row is published only
    after it), so a listener never hears of a row it cannot read yet."""
    text, payload = _log_entry(row, data, previous_status, stripe_event_id, event_type)
    args = (row["id"], row["seq"], row["status"], previous_status, stripe_event_id, event_type, text)
    if broker:
        await conn.execute(_APPEND_SQL + _QUEUE_TAIL, *args)
    else:
        await conn.execute(_APPEND_SQL + "SELECT pg_notify($8, $9) FROM logged", *args, CHANNEL, payload)
    return text


_APPEND_SQL = """WITH logged AS (
             INSERT INTO transaction_events
                    (transaction_id, seq, status, previous_status, stripe_event_id, event_type, data)
             VALUES ($1, $2, $3, $4, $5, $6, $7::json)
             RETURNING transaction_id, seq)
           """
# With the broker, the log row's pointer goes to the outbox in the same statement.
_QUEUE_TAIL = """, queued AS (
             INSERT INTO broker_outbox (transaction_id, seq) SELECT transaction_id, seq FROM logged
             RETURNING 1)
           SELECT count(*) FROM queued"""


async def move_and_log(
    conn: asyncpg.Connection,
    moved: dict[str, Any],
    *,
    previous_status: str | None,
    stripe_event_id: str | None,
    event_type: str | None,
    data: dict[str, Any] | None = None,
    finish_event: bool = False,
) -> None:
    """Move a locked transaction to `moved` (its next seq), log it and NOTIFY (or queue it
    for the broker), in one statement; with finish_event, also record stripe_event_id as applied to it.

    `moved` is the whole new row, made by the caller from the locked one, so the pushed
    JSON can be written in the same round trip as the row.  The schema's guards still
    check the step: the transactions trigger checks the transition and that seq grows by
    one; the log trigger checks that the log row's seq is the transaction's (it sees this
    statement's update).  A row that is not at seq - 1 moves nothing, and that is an
    error here."""
    text, payload = _log_entry(moved, data, previous_status, stripe_event_id, event_type)
    args = (moved["id"], moved["seq"], moved["status"], moved["last_error"], moved["validated"],
            moved["status_at"], moved["amount_refunded"], moved["updated_at"], previous_status,
            stripe_event_id, event_type, text, finish_event, moved["dispute"], moved.get("details"),
            event_floor(stripe_event_id))
    if broker:
        logged = await conn.fetchval(_MOVE_SQL + _QUEUE_TAIL, *args)
    else:
        logged = await conn.fetchval(_MOVE_SQL + "SELECT count(pg_notify($17, $18)) FROM logged",
                                     *args, CHANNEL, payload)
    if logged != 1:
        raise RuntimeError(f"transaction {moved['id']}: not at seq {moved['seq'] - 1} (moved by someone else?)")


_MOVE_SQL = """WITH moved AS (
             UPDATE transactions
                SET status = $3, last_error = $4, validated = $5, status_at = $6,
                    amount_refunded = $7, seq = $2, updated_at = $8, dispute = $14,
                    details = $15
              WHERE id = $1 AND seq = $2 - 1
          RETURNING id),
           logged AS (
             INSERT INTO transaction_events
                    (transaction_id, seq, status, previous_status, stripe_event_id, event_type, data)
             SELECT id, $2, $3, $9, $10, $11, $12::json FROM moved
             RETURNING transaction_id, seq),
           finished AS (
             UPDATE stripe_events
                SET processed_at = clock_timestamp(), outcome = 'applied', transaction_id = $1, error = NULL
              WHERE $13 AND id = $10 AND received_at >= $16 AND EXISTS (SELECT FROM logged)
          RETURNING 1)
           """


async def events_after(
    conn: asyncpg.Connection | asyncpg.Pool, txn_id: str, after: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT transaction_id, seq, status, data::text AS data FROM transaction_events
            WHERE transaction_id = $1 AND seq > $2 ORDER BY seq""",
        txn_id,
        after,
    )


async def events_after_many(
    conn: asyncpg.Connection | asyncpg.Pool, cursors: Iterable[tuple[str, int]]
) -> list[asyncpg.Record]:
    """Catch-up for many transactions in one query (after a listener reconnect)."""
    ids: list[str] = []
    afters: list[int] = []
    for txn_id, after in cursors:
        ids.append(txn_id)
        afters.append(after)
    if not ids:
        return []
    return await conn.fetch(
        """SELECT e.transaction_id, e.seq, e.status, e.data::text AS data
             FROM unnest($1::text[], $2::int[]) AS c(transaction_id, after_seq)
             JOIN transaction_events e
               ON e.transaction_id = c.transaction_id AND e.seq > c.after_seq
            ORDER BY e.transaction_id, e.seq""",
        ids,
        afters,
    )
