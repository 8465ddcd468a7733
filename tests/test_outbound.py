"""Outbound webhooks (outbound/delivery.py) below HTTP: the schedule, the signed message,
the settings check, and the queue's order, hand-over and replay on a real database of
their own (the whole-system tests share theirs with the e2e servers)."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from standardwebhooks import Webhook

from paystream import db
from paystream.changes import store
from paystream.config import Settings
from paystream.dev import trigger
from paystream.effects import outbound as outbound_effect
from paystream.ingest import webhooks
from paystream.outbound import delivery as outbound
from paystream.outbound.delivery import ATTEMPTS, JITTER, RETRY_DELAYS, Attempt, Deliverer

SECRET = "whsec_" + base64.b64encode(b"k" * 24).decode()


def test_the_schedule_retries_for_more_than_a_day_even_at_the_lowest_jitter() -> None:
    assert ATTEMPTS == 12
    assert sum(RETRY_DELAYS) * (1 - JITTER) > 24 * 3600
    assert list(RETRY_DELAYS) == sorted(RETRY_DELAYS)
    for n, nominal in enumerate(RETRY_DELAYS, start=1):
        delay = outbound.retry_delay(n, scale=0.5)
        assert delay is not None and nominal * 0.5 * (1 - JITTER) <= delay <= nominal * 0.5 * (1 + JITTER)
    assert outbound.retry_delay(ATTEMPTS) is None


def test_a_message_is_the_logged_event_in_the_envelope_and_verifies() -> None:
    data = '{"id":"txn_1","status":"succeeded","seq":3,"balance":{"amount":5}}'
    body = outbound.message_body("succeeded", datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=UTC), data)
    parsed = json.loads(body)
    assert parsed == {"type": "transaction.succeeded", "timestamp": "2026-11-22T10:00:00.123456Z",
                      "data": json.loads(data)}
    assert data in body  # byte for byte as logged
    headers = outbound.Signer(SECRET).headers("msg_1_3", body)
    assert headers["webhook-id"] == "msg_1_3" and headers["webhook-timestamp"].isdigit()
    assert Webhook(SECRET).verify(body, headers) == parsed
    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + base64.b64encode(b"x" * 24).decode()).verify(body, headers)


@pytest.mark.parametrize(("env", "problem"), [
    ({}, None),
    ({"PAYSTREAM_OUTBOUND_URL": "https://merchant.example/hooks", "PAYSTREAM_OUTBOUND_SECRET": SECRET}, None),
    ({"PAYSTREAM_OUTBOUND_URL": "https://merchant.example/hooks"}, "PAYSTREAM_OUTBOUND_SECRET is not"),
    ({"PAYSTREAM_OUTBOUND_SECRET": SECRET}, "PAYSTREAM_OUTBOUND_URL is not"),
    ({"PAYSTREAM_OUTBOUND_URL": "merchant.example/hooks", "PAYSTREAM_OUTBOUND_SECRET": SECRET}, "http"),
    ({"PAYSTREAM_OUTBOUND_URL": "https://m.example", "PAYSTREAM_OUTBOUND_SECRET": "whsec_!!not base64!!"},
     "not a Standard Webhooks secret"),
    ({"PAYSTREAM_OUTBOUND_URL": "https://m.example", "PAYSTREAM_OUTBOUND_SECRET": "whsec_c2hvcnQ="},
     "at least 16"),
    ({"PAYSTREAM_OUTBOUND_URL": "https://m.example", "PAYSTREAM_OUTBOUND_SECRET": SECRET[6:]}, "whsec_"),
])
def test_the_settings_are_checked_naming_the_variable_never_the_secret(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], problem: str | None) -> None:
    for name in ("PAYSTREAM_OUTBOUND_URL", "PAYSTREAM_OUTBOUND_SECRET"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    found = outbound.config_problem(Settings())
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found and SECRET[6:] not in found


# --- the queue, on a database of its own -------------------------------------------------


@pytest.fixture(scope="module")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    name = f"paystream_outbound_{secrets.token_hex(4)}"
    admin_url = urlunsplit(urlsplit(database_url)._replace(path="/postgres"))
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f"CREATE DATABASE {name}")
    url = urlunsplit(urlsplit(database_url)._replace(path=f"/{name}"))
    await db.migrate(url)
    p = await asyncpg.create_pool(url, init=store.init_connection, min_size=1, max_size=4)
    yield p
    await p.close()
    await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    await admin.close()


@pytest.fixture
def enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbound_effect.effect, "enabled", True)


class Recorded(Deliverer):
    """A deliverer whose POST is a list of answers to give, recording what it was sent."""

    def __init__(self, pool: asyncpg.Pool, answers: list[Attempt] | None = None) -> None:
        super().__init__(pool, "", url="http://unused.invalid/", secret=SECRET, backoff_scale=1e-6)
        self._own = pool
        self.answers = answers or []
        self.sent: list[tuple[str, dict]] = []

    async def post(self, webhook_id: str, body: str) -> Attempt:
        self.sent.append((webhook_id, json.loads(body)))
        return self.answers.pop(0) if self.answers else Attempt(200, None)

    async def drain(self) -> None:
        while (wait := await self.deliver_one()) is not None:
            if wait:
                await asyncio.sleep(wait)


async def story(pool: asyncpg.Pool, steps: list[str], **kw: object) -> str:
    pi = trigger.stripe_id("pi_")
    for k, step in enumerate(steps):
        event = trigger.build(step, pi, created=int(time.time()) - 100 + k, **kw)  # type: ignore[arg-type]
        await webhooks.apply_event(pool, event, json.dumps(event), {})
    return (await store.get_transaction(pool, pi))["id"]


STEPS = ["payment_intent.created", "payment_intent.processing", "payment_intent.succeeded"]


async def test_each_logged_event_is_queued_behind_the_one_before(pool: asyncpg.Pool, enabled: None) -> None:
    txn = await story(pool, STEPS)
    rows = await pool.fetch("SELECT seq, webhook_id, next_attempt_at FROM outbound_deliveries"
                            " WHERE transaction_id = $1 ORDER BY seq", txn)
    assert [r["seq"] for r in rows] == [1, 2, 3]
    assert rows[0]["next_attempt_at"] is not None and rows[1]["next_attempt_at"] is None
    assert rows[2]["next_attempt_at"] is None
    assert [r["webhook_id"] for r in rows] == [outbound_effect.webhook_id(txn, n) for n in (1, 2, 3)]

    deliverer = Recorded(pool)
    await deliverer.drain()
    mine = [(wid, body) for wid, body in deliverer.sent if body["data"]["id"] == txn]
    assert [body["data"]["seq"] for _, body in mine] == [1, 2, 3]
    assert [body["type"] for _, body in mine] == ["transaction.requires_payment_method",
                                                  "transaction.processing", "transaction.succeeded"]
    logged = await pool.fetch("SELECT data::text FROM transaction_events WHERE transaction_id = $1 ORDER BY seq", txn)
    assert [body["data"] for _, body in mine] == [json.loads(r["data"]) for r in logged]


async def test_the_data_carries_what_later_effects_added(pool: asyncpg.Pool, enabled: None) -> None:
    txn = await story(pool, STEPS, customer="cus_outbound", metadata={"paystream_kind": "wallet_top_up"})
    deliverer = Recorded(pool)
    await deliverer.drain()
    last = [body for _, body in deliverer.sent if body["data"]["id"] == txn][-1]
    assert last["data"]["balance"] == {"customer_id": "cus_outbound", "amount": 1500, "currency": "usd"}


async def test_a_failing_event_holds_back_the_next_until_it_is_given_up(pool: asyncpg.Pool, enabled: None) -> None:
    txn = await story(pool, STEPS[:2])
    refused = [Attempt(503, "HTTP 503")] * ATTEMPTS
    deliverer = Recorded(pool, refused)
    await deliverer.drain()
    mine = [body["data"]["seq"] for _, body in deliverer.sent if body["data"]["id"] == txn]
    assert mine == [1] * ATTEMPTS + [2], "seq 2 waits for all of seq 1's attempts"
    rows = await pool.fetch("SELECT seq, attempts, failed_at, delivered_at, last_status, last_error"
                            " FROM outbound_deliveries WHERE transaction_id = $1 ORDER BY seq", txn)
    assert (rows[0]["attempts"], rows[0]["last_status"], rows[0]["last_error"]) == (ATTEMPTS, 503, "HTTP 503")
    assert rows[0]["failed_at"] is not None and rows[0]["delivered_at"] is None
    assert rows[1]["delivered_at"] is not None and rows[1]["attempts"] == 1

    # A replay of the failed one: same webhook-id, a fresh schedule, and it goes before seq 2's replay.
    wid = outbound_effect.webhook_id(txn, 1)
    (first, second), unknown = await outbound.replay(pool, [outbound_effect.webhook_id(txn, 2), wid])
    assert unknown == [] and second["seq"] == 2
    assert (first["state"], first["attempts"], first["webhook_id"]) == ("pending", 0, wid)
    waiting = await pool.fetchval("SELECT next_attempt_at FROM outbound_deliveries WHERE transaction_id = $1"
                                  " AND seq = 2", txn)
    assert waiting is None, "the later event waits for the replayed earlier one"
    deliverer = Recorded(pool)
    await deliverer.drain()
    assert [(w, b["data"]["seq"]) for w, b in deliverer.sent] == [(wid, 1), (outbound_effect.webhook_id(txn, 2), 2)]
    assert await outbound.replay(pool, ["msg_nothing_1", "99999999"]) == ([], ["msg_nothing_1", "99999999"])


async def test_the_gauges_count_the_queue(pool: asyncpg.Pool, enabled: None) -> None:
    from paystream.ops import metrics

    await story(pool, STEPS[:1])
    await outbound.refresh_gauges(pool)
    assert metrics.OUTBOUND_PENDING._value.get() >= 1
    await Recorded(pool).drain()
    await outbound.refresh_gauges(pool)
    assert metrics.OUTBOUND_PENDING._value.get() == 0
    assert metrics.OUTBOUND_OLDEST._value.get() == 0
    assert metrics.OUTBOUND_FAILED._value.get() == await pool.fetchval(
        "SELECT count(*) FROM outbound_deliveries WHERE failed_at IS NOT NULL")
