"""Stripe webhook: verify the raw body, store the event, apply it, NOTIFY — one transaction."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import asyncpg
import stripe
from starlette.requests import Request
from starlette.responses import JSONResponse

from paystream.bodies import read_limited
from paystream.changes import store, transitions
from paystream.db import ACQUIRE_TIMEOUT, DATABASE_DOWN, within
from paystream.errors import ApiError, error_response
from paystream.ingest.stripe_events import (
    MalformedEvent,
    Meaning,
    UnusableEvent,
    check_envelope,
    interpret,
    is_supported,
)
from paystream.ops import metrics

log = logging.getLogger("paystream.webhooks")

# Headers worth keeping with the raw body for an operator (never Authorization or cookies).
_KEPT_HEADERS = ("stripe-signature", "content-type", "user-agent", "content-length")
# The longest a webhook waits on the database before it is refused (503; Stripe retries),
# as long as one query may take (the pool's command_timeout).  Without it, a webhook whose
# connection went silent waited 10 s for the query timeout, then for asyncpg to cancel the
# query and release the connection: 13-20 s in a partition (tests/e2e/test_partition.py).
# Work cut off at COMMIT may still commit; Stripe's retry is then a duplicate.
WEBHOOK_DEADLINE = 10.0


# Postgres breaks a deadlock (two transactions locking the same rows in different orders,
# e.g. a webhook and an API call, or two webhooks about related objects) by rolling one of
# them back, whole; a serialization failure is the same kind of tie.  That one is applied
# again at once, from the start: nothing of it was kept, and the other has gone on.
_CONFLICTS = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
CONFLICT_ATTEMPTS = 3


class _Duplicate(Exception):
    """Raised inside the database transaction to roll back a repeat delivery."""

    def __init__(self, outcome: str | None) -> None:
        self.outcome = outcome


def verify(raw: bytes, signature: str | None, secrets: list[str], tolerance: int) -> str:
    """Accept the body if any configured secret signed it within the tolerance, and return
    it as the text that was signed (what stripe_events.raw_body keeps).

    The check is stripe-python's own: `stripe.WebhookSignature.verify_header` is the first
    thing `stripe.Webhook.construct_event` does (the contract names construct_event).  The
    rest of construct_event builds a StripeObject tree of the whole event, which this
    handler would throw away (it stores the raw body and parses it once itself): 220 µs of
    a webhook's ~1 ms of server CPU, against 6.5 µs for the check (S3 profile).  The
    accept/reject decision is the same; tests/test_parsing.py compares the two."""
    if not signature:
        raise ApiError(400, "missing_signature", "the Stripe-Signature header is missing")
    try:
        payload = raw.decode("utf-8")  # Stripe signs the text of the body
    except UnicodeDecodeError:
        raise ApiError(400, "malformed_body", "the body is not UTF-8 text") from None
    stale = False
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(payload, signature, secret, tolerance)
        except stripe.SignatureVerificationError as exc:  # every header problem lands here too
            stale = stale or "tolerance" in str(exc).lower()
            continue
        # verify_header refuses only old timestamps; one from the future would let a
        # captured signature be replayed until then.
        if _signed_at(signature) > time.time() + tolerance:
            raise ApiError(400, "stale_signature", "the signature's timestamp is in the future, beyond the tolerance")
        return payload
    if stale:
        raise ApiError(400, "stale_signature", "the signature's timestamp is outside the tolerance")
    raise ApiError(400, "invalid_signature", "no webhook secret verifies this signature")


def _signed_at(signature: str) -> int:
    """The header's t= (verify_header has just accepted it, so there is a whole number)."""
    for item in signature.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t" and value.isascii() and value.isdigit():
            return int(value)
    return 0


async def handle(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    raw = await read_limited(request, settings.max_body_bytes)
    text = verify(raw, request.headers.get("stripe-signature"), settings.webhook_secrets,
                  settings.webhook_tolerance_seconds)
    try:
        event = json.loads(raw)
        check_envelope(event)
    except (ValueError, RecursionError, MalformedEvent) as exc:
        metrics.WEBHOOKS.labels("malformed").inc()
        raise ApiError(400, "malformed_body", str(exc) if isinstance(exc, MalformedEvent)
                       else "the body is not JSON") from None
    headers = {k: v for k, v in request.headers.items() if k in _KEPT_HEADERS}
    try:
        outcome = await within(WEBHOOK_DEADLINE, apply_event(request.app.state.pool, event, text, headers))
    except DATABASE_DOWN as exc:
        log.warning("webhook not stored: the database is unreachable (%s)", exc,
                    extra={"stripe_event_id": event["id"], "event_type": event["type"]})
        metrics.WEBHOOKS.labels("database_down").inc()
        return error_response(503, "database_unavailable", "the event could not be stored; Stripe retries it")
    except Exception:  # logged, and the event kept as failed, by apply_event
        metrics.WEBHOOKS.labels("failed").inc()
        return error_response(500, "event_failed", "the event could not be applied; it is kept as failed "
                              "for `paystream events --reprocess`, and Stripe retries it")
    metrics.WEBHOOKS.labels(outcome).inc()
    if outcome == "ignored":
        metrics.IGNORED.labels(event["type"]).inc()
    return JSONResponse({"received": True, "id": event["id"], "outcome": outcome})


async def apply_event(pool: asyncpg.Pool, event: dict[str, Any], raw: str,
                      headers: dict[str, str]) -> str:
    """Store and apply one verified event; return its outcome. Commits before returning."""
    try:
        meaning = interpret(event) if is_supported(event["type"]) else None
    except UnusableEvent as exc:
        return await _keep_unusable(pool, event, raw, headers, str(exc))
    try:
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                outcome, txn_id = await _store_and_apply(pool, event, raw, headers, meaning)
                break
            except _CONFLICTS as exc:
                if attempt == CONFLICT_ATTEMPTS:
                    raise
                metrics.WEBHOOK_CONFLICTS.inc()
                log.warning("webhook rolled back by Postgres (%s); applying it again", type(exc).__name__,
                            extra={"stripe_event_id": event["id"], "event_type": event["type"]})
        if outcome == "ignored":
            return outcome
    except _Duplicate:
        log.info("duplicate delivery", extra={"stripe_event_id": event["id"]})
        return "duplicate"
    except DATABASE_DOWN:
        raise  # the database itself is unreachable: nothing can be recorded; Stripe retries
    except Exception as exc:
        # A bug or an event we cannot apply: keep it, unprocessed, for an operator to see
        # and re-process (`paystream events`), then answer 500 so Stripe retries too.
        log.exception("webhook failed", extra={"stripe_event_id": event["id"], "event_type": event["type"]})
        await _record_failure(pool, event, raw, headers, f"{type(exc).__name__}: {exc}")
        raise
    log.info("webhook %s", outcome, extra={"stripe_event_id": event["id"], "event_type": event["type"],
                                           "transaction_id": txn_id})
    return outcome


async def _store_and_apply(pool: asyncpg.Pool, event: dict[str, Any], raw: str, headers: dict[str, str],
                           meaning: Meaning | None) -> tuple[str, str | None]:
    """One database transaction: store the event, apply it, commit."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
        # Storing the event and locking its transaction share one round trip: the
        # webhook is four (BEGIN, this, the move, COMMIT) in the common case.
        stored, locked = await store.record_and_lock(conn, event, raw, headers,
                                                     meaning.stripe_id if meaning else None)
        if stored["processed_at"] is not None or stored["outcome"] == "parked":
            raise _Duplicate(stored["outcome"])
        if meaning is None:
            # Authentic, of a type paystream does not use: answered 200 (a 4xx would
            # have Stripe retry it for three days and may disable the endpoint), kept.
            await store.finish_stripe_event(conn, event["id"], outcome="ignored")
            return "ignored", None
        return await transitions.apply_stored_event(conn, event, meaning, locked)


async def _keep_unusable(pool: asyncpg.Pool, event: dict[str, Any], raw: str, headers: dict[str, str],
                         error: str) -> str:
    """Keep an authentic event paystream cannot apply, unapplied, for operators (outcome
    `invalid`, `paystream events invalid`), and answer it 200: Stripe's retries would
    bring the same bytes for three days."""
    log.warning("webhook invalid: %s", error, extra={"stripe_event_id": event["id"], "event_type": event["type"]})
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
        stored = await store.record_stripe_event(conn, event, raw, headers)
        if stored["processed_at"] is not None:
            return "duplicate"
        await store.finish_stripe_event(conn, event["id"], outcome="invalid", error=error[:2000], processed=False)
    return "invalid"


async def _record_failure(pool: asyncpg.Pool, event: dict[str, Any], raw: str, headers: dict[str, str],
                          error: str) -> None:
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
        stored = await store.record_stripe_event(conn, event, raw, headers)
        if stored["processed_at"] is None:
            await store.finish_stripe_event(conn, event["id"], outcome="failed", error=error[:2000],
                                            processed=False)


async def reprocess(pool: asyncpg.Pool, event_id: str) -> str:
    """Apply a stored, unprocessed event again (an operator's retry after a fix)."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
        row = await conn.fetchrow("SELECT raw_body, processed_at FROM stripe_events WHERE id = $1 FOR UPDATE",
                                  event_id)
        if row is None:
            return "unknown"
        if row["processed_at"] is not None:
            return "duplicate"
        event = json.loads(row["raw_body"])
        if not is_supported(event["type"]):
            await store.finish_stripe_event(conn, event_id, outcome="ignored")
            return "ignored"
        outcome, _ = await transitions.apply_stored_event(conn, event)
    return outcome
