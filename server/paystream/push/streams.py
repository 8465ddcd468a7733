"""What every stream (SSE, WebSocket, long-poll) shares: who may read a transaction, and
opening a subscription.  Every stream opens the same way (open_subscription): register
with the hub first, then read, so no event can fall between the read and the first
push.  After that, what a client sees comes only from its Subscription: ordered by seq,
never twice.  And every stream ends the same way: a client that does not read gets
CLOSE_GRACE seconds for its last bytes, then its connection is aborted (abort).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Callable
from typing import Any

import asyncpg
from starlette.requests import HTTPConnection, Request

from paystream.auth import access
from paystream.auth.tokens import Grant
from paystream.changes import follows, store
from paystream.errors import ApiError
from paystream.push.hub import Hub
from paystream.push.subscription import Subscription

# A stream that is ending (cut off, shut down, or done) waits at most this long for a client
# that does not read to take its last bytes; then the connection is aborted.
CLOSE_GRACE = 5.0


def abort(transport: asyncio.BaseTransport) -> None:
    """Drop a connection whose peer does not read, now, with everything queued for it.

    A plain close() waits until every queued byte is written, which for such a peer is
    never: the socket stayed open with megabytes queued in the process and in the kernel.
    abort() drops the process's buffer; a zero linger makes the kernel send a reset and
    drop its own buffer too, instead of keeping the data (and the socket) to deliver."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def precheck(grant: Grant, any_id: str) -> None:
    """Refuse, before any query, an id a transaction-list token cannot cover (Grant.may_name);
    a token listing a Checkout Session may also name what the session follows."""
    if not grant.may_name(any_id) and not any(listed.startswith("cs_") for listed in grant.txn):
        raise ApiError(403, "forbidden", "the token does not cover this transaction")


def covered(grant: Grant, any_id: str, row: asyncpg.Record | None) -> asyncpg.Record:
    """The row, if the grant covers it.  A customer token gets the same 403 for an id
    that does not exist as for another customer's, so it cannot probe which ids exist;
    the API key, or a token naming the id, learns 404."""
    if row is not None and grant.allows(row["id"], row["stripe_id"], row["customer_id"]):
        return row
    if row is None and (grant.backend or any_id in grant.txn):
        raise ApiError(404, "not_found", f"no transaction {any_id!r}")
    raise ApiError(403, "forbidden", "the token does not cover this transaction")


async def covered_or_followed(pool: asyncpg.Pool, grant: Grant, any_id: str,
                              row: asyncpg.Record | None) -> asyncpg.Record:
    """covered(), and for a token listing transactions, also a transaction one of them
    follows (a Checkout Session's PaymentIntent or subscription: changes/follows.py).
    The extra query runs only for what the token does not cover itself."""
    try:
        return covered(grant, any_id, row)
    except ApiError:
        if row is None or not grant.txn or not row["stripe_id"]:
            raise
        listed = [i for i in grant.txn if store.plausible_id(i)]
        followed = await follows.followed_by(pool, [i for i in listed if i.startswith("txn_")],
                                             [i for i in listed if not i.startswith("txn_")])
        if row["stripe_id"] in followed:
            return row
        raise


async def read_covered(pool: asyncpg.Pool, grant: Grant, any_id: str) -> asyncpg.Record:
    precheck(grant, any_id)
    return await covered_or_followed(pool, grant, any_id, await store.get_transaction(pool, any_id))


async def open_subscription(
    conn: HTTPConnection, any_id: str, grant: Grant, after: int | None
) -> tuple[asyncpg.Record, Subscription]:
    """Authorise, subscribe, and read the transaction (after subscribing when a snapshot
    is wanted). Raises ApiError 403/404; never leaves a subscription behind on error."""
    hub: Hub = conn.app.state.hub
    pool: asyncpg.Pool = conn.app.state.pool
    precheck(grant, any_id)
    sub: Subscription | None = None
    if any_id.startswith("txn_") and after is None:
        sub = hub.subscribe(any_id)  # the common case: one query, after subscribing
    try:
        row = await covered_or_followed(pool, grant, any_id, await store.get_transaction(pool, any_id))
        if sub is None:
            sub = hub.subscribe(row["id"], after)
            if after is None:
                row = await store.get_transaction(pool, row["id"])
                assert row is not None
        if after is None:
            hub.activate(sub, row["seq"])
        return row, sub
    except BaseException:
        if sub is not None:
            hub.unsubscribe(sub)
        raise


async def open_stream(
    request: Request, any_id: str, grant: Grant, after: int | None
) -> tuple[asyncpg.Record, Subscription, Callable[[], None]]:
    """A counted stream (429 past the limits) over open_subscription; call the returned
    release() when the stream ends."""
    release = request.app.state.limits.acquire(grant, access.address(request))
    try:
        row, sub = await open_subscription(request, any_id, grant, after)
    except BaseException:
        release()
        raise
    return row, sub, release


# The largest resume cursor a client may send (SSE Last-Event-ID / last_event_id, WebSocket
# `after`): nine digits, well inside Postgres' integer (seq) column, so no cursor a client
# sends can make the hub's log query fail.
MAX_CURSOR = 999_999_999


def cursor(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > len(str(MAX_CURSOR)):  # "²".isdigit() is true
        raise ApiError(400, "bad_request", f"{name} must be a whole number from 0 to {MAX_CURSOR}")
    return int(value)


def flag(value: str | None, name: str) -> bool:
    if value is None or value.lower() in ("false", "0", ""):
        return False
    if value.lower() in ("true", "1"):
        return True
    raise ApiError(400, "bad_request", f"{name} must be true or false")


def state_of(data: str) -> dict[str, Any]:
    """The transaction JSON inside a pushed event (without previous_status and cause)."""
    state = json.loads(data)
    state.pop("previous_status", None)
    state.pop("cause", None)
    return state


