"""GET /v1/transactions/{id}/events: snapshot, live push, resume, close, ping, access."""

from __future__ import annotations

import time

import jwt
import pytest

from paystream.dev import trigger
from tests.support import Paystream, wait_until

pytestmark = pytest.mark.e2e


async def started(ps: Paystream, status: str = "processing") -> tuple[str, str]:
    pi = trigger.stripe_id("pi_")
    txn = await ps.deliver(ps.event(f"payment_intent.{status}", pi, created=int(time.time()) - 60))
    assert txn["outcome"] == "applied"
    return pi, (await ps.get(pi)).json()["id"]


async def test_a_webhook_reaches_a_waiting_browser(ps: Paystream) -> None:
    pi, txn_id = await started(ps)
    async with ps.sse(txn_id) as stream:
        first = await stream.frame()
        assert first.retry == 1000 and first.event is None
        snap = await stream.event()
        assert (snap.event, snap.id, snap.json["status"], snap.json["seq"]) == ("snapshot", "1", "processing", 1)
        event = ps.event("payment_intent.succeeded", pi)
        await ps.deliver(event)
        push = await stream.event()
        assert (push.event, push.id) == ("status", "2")
        assert push.json["status"] == "succeeded" and push.json["previous_status"] == "processing"
        assert push.json["cause"] == {"stripe_event_id": event["id"], "type": "payment_intent.succeeded"}
        assert await stream.event() is None  # closed after a final status


async def test_stripe_id_works_as_the_stream_id(ps: Paystream) -> None:
    pi, _ = await started(ps)
    async with ps.sse(pi) as stream:
        assert (await stream.event()).json["stripe_id"] == pi


async def test_resume_with_last_event_id_replays_what_was_missed(ps: Paystream) -> None:
    pi, txn_id = await started(ps, "requires_action")
    async with ps.sse(txn_id) as stream:
        assert (await stream.event()).id == "1"
    # the browser is gone while these happen
    now = int(time.time())
    await ps.deliver(ps.event("payment_intent.processing", pi, created=now))
    await ps.deliver(ps.event("payment_intent.succeeded", pi, created=now + 1))
    async with ps.sse(txn_id, last_event_id=1) as stream:
        frames = await stream.rest()
    assert [(f.event, f.id, f.json["status"]) for f in frames] == [
        ("status", "2", "processing"), ("status", "3", "succeeded")]


async def test_last_event_id_zero_replays_the_whole_log(ps: Paystream) -> None:
    pi, txn_id = await started(ps)
    await ps.deliver(ps.event("payment_intent.succeeded", pi))
    async with ps.sse(txn_id, params={"last_event_id": "0"}) as stream:
        frames = await stream.rest()
    assert [f.id for f in frames] == ["1", "2"] and {f.event for f in frames} == {"status"}


async def test_resume_after_the_end_closes_at_once(ps: Paystream) -> None:
    pi, txn_id = await started(ps)
    await ps.deliver(ps.event("payment_intent.succeeded", pi))
    async with ps.sse(txn_id, last_event_id=2) as stream:
        assert await stream.rest() == []


async def test_follow_keeps_the_stream_open_after_a_final_status(ps: Paystream) -> None:
    pi, txn_id = await started(ps)
    async with ps.sse(txn_id, params={"follow": "true"}) as stream:
        await stream.event()
        await ps.deliver(ps.event("payment_intent.succeeded", pi))
        assert (await stream.event()).json["status"] == "succeeded"
        await ps.deliver(ps.event("charge.refunded", pi, amount=1500, amount_refunded=500))
        assert (await stream.event()).json["status"] == "partially_refunded"


async def test_many_fast_events_arrive_once_each_in_order(ps: Paystream) -> None:
    pi, txn_id = await started(ps, "created")
    steps = ["requires_action", "processing", "succeeded"]
    async with ps.sse(txn_id) as stream:
        await stream.event()
        now = int(time.time())
        for i, step in enumerate(steps):
            await ps.deliver(ps.event(f"payment_intent.{step}", pi, created=now + i))
            await ps.deliver(ps.event(f"payment_intent.{step}", pi, created=now + i))  # Stripe retries
        frames = await stream.rest()
    assert [int(f.id) for f in frames] == [2, 3, 4]
    assert [f.json["status"] for f in frames] == steps


async def test_idle_streams_get_a_comment_ping(ps: Paystream) -> None:
    _, txn_id = await started(ps)
    async with ps.sse(txn_id) as stream:
        await stream.event()
        frame = await stream.frame(timeout=5)  # the test server pings every second
        assert frame.comments == ["ping"] and frame.event is None


async def test_a_client_that_leaves_is_released_at_once(ps: Paystream) -> None:
    """The stream notices the socket closing while it waits (not at its next write)."""
    _, txn_id = await started(ps)

    async def open_sse_streams() -> float:
        metrics = (await ps.http.get("/metrics")).text
        return sum(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith('paystream_connections{transport="sse"} '))

    before = await open_sse_streams()  # the suite's server may hold others' streams
    async with ps.sse(txn_id, params={"follow": "true"}) as stream:
        assert (await stream.event()).event == "snapshot"
        assert await open_sse_streams() >= 1

    async def released() -> bool:
        return await open_sse_streams() <= before

    await wait_until(released, what="the closed stream to be released")


@pytest.mark.parametrize(
    ("token", "status"),
    [
        (None, 401),
        ("expired", 401),
        ("forged", 401),
        ("other", 403),
    ],
)
async def test_stream_access(ps: Paystream, token: str | None, status: int) -> None:
    _, txn_id = await started(ps)
    secret = ps.server.token_secret
    tokens = {
        "expired": jwt.encode({"exp": int(time.time()) - 1, "txn": [txn_id]}, secret, "HS256"),
        "forged": jwt.encode({"exp": int(time.time()) + 60, "txn": [txn_id]}, "x" * 32, "HS256"),
        "other": ps.token("txn_01JAAAAAAAAAAAAAAAAAAAAAAA"),
    }
    params = {"token": tokens[token]} if token else {}
    resp = await ps.http.get(f"/v1/transactions/{txn_id}/events", params=params)
    assert resp.status_code == status
    assert resp.json()["error"]["code"] == {401: "unauthorized", 403: "forbidden"}[status]


async def test_a_customer_token_opens_that_customers_transactions(ps: Paystream) -> None:
    pi = trigger.stripe_id("pi_")
    await ps.deliver(ps.event("payment_intent.processing", pi, customer="cus_alice"))
    async with ps.sse(pi, token=ps.token(cus="cus_alice")) as stream:
        assert (await stream.event()).json["customer_id"] == "cus_alice"
    resp = await ps.http.get(f"/v1/transactions/{pi}/events", params={"token": ps.token(cus="cus_bob")})
    assert resp.status_code == 403


async def test_unknown_transaction_is_404_and_bad_cursor_400(ps: Paystream) -> None:
    missing = "txn_01JZZZZZZZZZZZZZZZZZZZZZZZ"
    resp = await ps.http.get(f"/v1/transactions/{missing}/events", params={"token": ps.token(missing)})
    assert resp.status_code == 404
    _, txn_id = await started(ps)
    for cursor in ("-3", "²", "1e3"):  # "²" passed str.isdigit() (found by hypothesis)
        resp = await ps.http.get(f"/v1/transactions/{txn_id}/events",
                                 params={"token": ps.token(txn_id), "last_event_id": cursor})
        assert resp.status_code == 400, cursor


async def test_a_live_push_reads_nothing_from_the_database(ps: Paystream) -> None:
    """The notification carries the event: a subscriber at the previous seq gets it from
    there, with no read of the log (issue 13: zero database reads per push)."""
    pi = trigger.stripe_id("pi_")
    await ps.deliver(ps.event("payment_intent.processing", pi, created=int(time.time()) - 5))

    async def counters() -> tuple[float, float]:
        text = (await ps.http.get("/metrics", headers=ps.backend)).text
        values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                  if line.startswith(("paystream_log_reads_total ", "paystream_notifications_pushed_total "))}
        return values.get("paystream_log_reads_total", 0.0), values.get("paystream_notifications_pushed_total", 0.0)

    async with ps.sse(pi) as stream:
        assert (await stream.event()).event == "snapshot"
        reads, pushed = await counters()
        await ps.deliver(ps.event("payment_intent.succeeded", pi))
        assert (await stream.event()).json["status"] == "succeeded"
    reads_after, pushed_after = await counters()
    assert (reads_after - reads, pushed_after - pushed) == (0, 1)
