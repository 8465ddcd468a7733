"""Signed webhooks to the merchant's backend, end to end: a real `paystream serve` POSTs to
a backend in this process that verifies every message with the standardwebhooks library,
refuses some at random, goes away for a while, and sees paystream killed mid-delivery;
and every event of a subscription's and a Checkout Session's life (issue 23)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest
from standardwebhooks import Webhook

from paystream.dev import trigger
from paystream.dev.localstripe import LocalStripe
from paystream.dev.processes import free_port
from paystream.effects.outbound import webhook_id
from paystream.ingest.stripe_events import is_supported
from paystream.outbound.delivery import ATTEMPTS, JITTER, RETRY_DELAYS
from tests.conftest import ARTIFACTS, Server
from tests.e2e.new_kinds import DECLINED, IBAN_OK, URLS, VISA, Stripe, own_emulator
from tests.support import Paystream, wait_until

pytestmark = pytest.mark.e2e

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
STEPS = ["payment_intent.created", "payment_intent.requires_action", "payment_intent.processing",
         "payment_intent.succeeded"]


@dataclass
class Request:
    n: int                         # arrival order at the backend
    at: float                      # monotonic arrival time
    webhook_id: str
    body: dict | None              # the verified message; None if it did not verify
    answer: int | None = None      # the status sent back; None: no answer (dropped, or hung)

    @property
    def key(self) -> tuple[str, int] | None:
        return (self.body["data"]["id"], self.body["data"]["seq"]) if self.body else None

    @property
    def accepted(self) -> bool:
        return self.answer is not None and 200 <= self.answer < 300


@dataclass
class Backend:
    """The merchant's webhook endpoint: plain HTTP/1.1 on asyncio, keep-alive included.
    `refuse` of the attempts get a 503 or (one in three of those) a dropped connection, at
    random, but one message at most `streak` times in a row: so a test's small backoff
    scale cannot run a message's whole schedule out by bad luck."""

    refuse: float = 0.0
    streak: int = 3
    port: int = field(default_factory=free_port)
    requests: list[Request] = field(default_factory=list)
    hang_next: bool = False        # the next request gets no answer for HANG seconds
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _rng: random.Random = field(default_factory=lambda: random.Random(12))
    _news: asyncio.Event = field(default_factory=asyncio.Event)
    _refused: dict[str, int] = field(default_factory=dict)  # refusals in a row, by webhook-id

    HANG = 11.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/paystream"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)

    async def stop(self) -> None:
        """Down: the port closed, and every open connection with it."""
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def arrival(self) -> None:
        """Until the next request arrives."""
        await self._news.wait()

    def accepted(self, keys: set[tuple[str, int]] | None = None) -> dict[tuple[str, int], Request]:
        first: dict[tuple[str, int], Request] = {}
        for r in self.requests:
            if r.accepted and r.key not in first and (keys is None or r.key in keys):
                first[r.key] = r
        return first

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while await reader.readline():  # the request line
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status = await self._answer(headers, body)
                if status is None:
                    writer.transport.abort()
                    return
                writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, headers: dict[str, str], body: bytes) -> int | None:
        try:
            message = Webhook(SECRET).verify(body, headers)
        except Exception:
            message = None
        request = Request(len(self.requests), time.monotonic(), headers.get("webhook-id", ""), message)
        self.requests.append(request)
        self._news.set()
        self._news = asyncio.Event()
        if message is None:
            request.answer = 400
        elif self.hang_next:
            self.hang_next = False
            await asyncio.sleep(self.HANG)  # paystream gives up after 10 s
            return None
        elif self._rng.random() < self.refuse and self._refused.get(request.webhook_id, 0) < self.streak:
            self._refused[request.webhook_id] = self._refused.get(request.webhook_id, 0) + 1
            if self._rng.random() < 1 / 3:
                return None
            request.answer = 503
        else:
            self._refused.pop(request.webhook_id, None)
            await asyncio.sleep(self._rng.uniform(0, 0.03))  # a backend doing some work
            request.answer = 204
        return request.answer


def outbound_env(backend: Backend, local_stripe: LocalStripe, scale: float) -> dict[str, str]:
    return {"STRIPE_API_BASE": local_stripe.url, "PAYSTREAM_OUTBOUND_URL": backend.url,
            "PAYSTREAM_OUTBOUND_SECRET": SECRET, "PAYSTREAM_OUTBOUND_BACKOFF_SCALE": str(scale)}


class Count:
    """Webhooks answered so far; others await a number of them."""

    def __init__(self) -> None:
        self.n = 0
        self._changed = asyncio.Condition()

    async def add(self) -> None:
        async with self._changed:
            self.n += 1
            self._changed.notify_all()

    async def reached(self, n: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.n >= n)


async def send_like_stripe(ps: Paystream, event: dict, sent: Count) -> None:
    """POST until a 200, backing off as Stripe does (faster)."""
    delay, give_up = 0.05, time.monotonic() + 60
    while True:
        with contextlib.suppress(httpx.TransportError):
            if (await ps.send(event)).status_code == 200:
                await sent.add()
                return
        assert time.monotonic() < give_up, f"{event['id']} never accepted"
        await asyncio.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 2, 0.5)


async def logged(db: asyncpg.Connection, pis: list[str]) -> dict[tuple[str, int], dict]:
    rows = await db.fetch("SELECT e.transaction_id, e.seq, e.status, e.data::text AS data FROM transaction_events e"
                          " JOIN transactions t ON t.id = e.transaction_id WHERE t.stripe_id = ANY($1)", pis)
    return {(r["transaction_id"], r["seq"]): {"status": r["status"], "data": json.loads(r["data"])} for r in rows}


async def scrape(server: Server, name: str) -> float | None:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{server.base_url}/metrics")).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


async def test_every_logged_event_reaches_the_backend_signed_once_per_id_in_order(
        database_url: str, local_stripe: LocalStripe, db: asyncpg.Connection) -> None:
    backend = Backend(refuse=0.3)
    await backend.start()
    server = Server(database_url, outbound_env(backend, local_stripe, scale=0.0005))
    await asyncio.to_thread(server.start)
    began = time.monotonic()
    try:
        async with Paystream(server) as ps:
            base = int(time.time()) - 100
            pis = [trigger.stripe_id("pi_") for _ in range(30)]
            stories = []
            for k, pi in enumerate(pis):
                wallet = k % 5 == 0  # a wallet top-up: its success carries `balance`, added by an effect
                kw = {"customer": "cus_outbound_e2e", "metadata": {"paystream_kind": "wallet_top_up"}} if wallet else {}
                stories.append([ps.event(step, pi, created=base + i, **kw) for i, step in enumerate(STEPS)])
            events = [e for story in stories for e in story]
            queue: asyncio.Queue[list[dict]] = asyncio.Queue()
            for story in stories:
                queue.put_nowait(story)
            sent = Count()
            timeline: dict[str, float] = {}

            async def sender() -> None:  # transactions interleaved, each one's events in order
                while not queue.empty():
                    for event in queue.get_nowait():
                        await send_like_stripe(ps, event, sent)
                        await asyncio.sleep(0.02)  # a stream of webhooks, not one burst

            async def outage() -> None:
                await sent.reached(len(events) // 4)
                await backend.stop()
                timeline["backend_down"] = time.monotonic() - began
                await asyncio.sleep(1.5)
                await backend.start()
                timeline["backend_up"] = time.monotonic() - began

            async def crash() -> None:
                await sent.reached(len(events) // 2)
                # Mid-delivery: wait for an attempt to be in flight (the backend answers after a while).
                await backend.arrival()
                server.proc.send_signal(signal.SIGKILL)
                await asyncio.to_thread(server.proc.wait)
                timeline["killed"] = time.monotonic() - began
                await asyncio.to_thread(server.start)  # same port, same database
                timeline["restarted"] = time.monotonic() - began
                backend.hang_next = True  # and the first attempt after it times out

            await asyncio.gather(outage(), crash(), *(sender() for _ in range(6)))
            timeline["webhooks_done"] = time.monotonic() - began

            want: dict[tuple[str, int], dict] = {}

            async def all_received() -> bool:
                want.update(await logged(db, pis))
                return set(backend.accepted(set(want))) == set(want)

            await wait_until(all_received, timeout=45, what="every logged event at the backend")
            timeline["drained"] = time.monotonic() - began
            got = backend.accepted(set(want))

            # Every message verified; the data is the pushed event exactly as logged.
            assert all(r.body is not None for r in backend.requests), "every message verifies"
            for key, request in got.items():
                assert request.body["type"] == f"transaction.{want[key]['status']}"
                assert request.body["data"] == want[key]["data"]
            succeeded = [got[k].body["data"] for k in want if want[k]["status"] == "succeeded"]
            assert any("balance" in d for d in succeeded), "fields added by effects are delivered"

            # One webhook-id per event, on every attempt; none shared between events.
            ids: dict[tuple[str, int], set[str]] = {}
            for r in backend.requests:
                if r.key in want:
                    ids.setdefault(r.key, set()).add(r.webhook_id)
            assert all(ids[k] == {webhook_id(*k)} for k in want)

            # In seq order per transaction: no attempt at seq n+1 before seq n was accepted.
            for (txn, seq), first in got.items():
                if (txn, seq + 1) in want:
                    later = [r.n for r in backend.requests if r.key == (txn, seq + 1)]
                    assert min(later) > first.n, f"{txn}: seq {seq + 1} was sent before seq {seq} was received"

            # The worker records a delivery after the backend's answer reaches it: the last
            # one may be accepted above a moment before its row says so.
            async def recorded() -> bool:
                return await db.fetchval(
                    "SELECT bool_and(delivered_at IS NOT NULL) FROM outbound_deliveries d"
                    " JOIN transactions t ON t.id = d.transaction_id WHERE t.stripe_id = ANY($1)", pis)

            await wait_until(recorded, timeout=15, what="every delivery recorded as delivered")
            rows = await db.fetch("SELECT delivered_at IS NOT NULL AS done, attempts FROM outbound_deliveries d"
                                  " JOIN transactions t ON t.id = d.transaction_id WHERE t.stripe_id = ANY($1)", pis)
            assert len(rows) == len(want) and all(r["done"] for r in rows)

            async def no_backlog() -> bool:
                return await scrape(server, "paystream_outbound_pending") == 0.0

            await wait_until(no_backlog, timeout=15, what="/metrics to show an empty queue")
            assert (await scrape(server, "paystream_outbound_delivery_seconds_count") or 0) > 0

            mine = [r for r in backend.requests if r.key in want]
            per_event = [sum(1 for r in mine if r.key == k) for k in want]
            numbers = {
                "transactions": len(pis), "webhooks": len(events), "logged_events": len(want),
                "attempts_received": len(mine),
                "refused_503": sum(1 for r in mine if r.answer == 503),
                "dropped_or_timed_out": sum(1 for r in mine if r.answer is None),
                "repeat_deliveries_after_a_2xx": sum(1 for r in mine if r.accepted) - len(want),
                "max_attempts_for_one_event": max(per_event),
                "attempts_recorded_in_db": sum(r["attempts"] for r in rows),
                **{k: round(v, 2) for k, v in timeline.items()},
                "drain_after_last_webhook_s": round(timeline["drained"] - timeline["webhooks_done"], 2),
            }
            print(json.dumps(numbers))
            await asyncio.to_thread(Path(ARTIFACTS, "outbound-e2e.json").write_text, json.dumps(numbers, indent=2))
            assert numbers["refused_503"] > 0 and numbers["dropped_or_timed_out"] > 0
    finally:
        server.stop()
        with contextlib.suppress(AssertionError):
            await backend.stop()


async def paystream_cli(database_url: str, *args: str) -> list[dict]:
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "paystream", "deliveries", *args], capture_output=True, text=True,
        env={**os.environ, "DATABASE_URL": database_url}, timeout=60)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


async def test_a_backend_that_always_refuses_gets_the_whole_schedule_then_failed_then_replay(
        database_url: str, local_stripe: LocalStripe, db: asyncpg.Connection) -> None:
    scale = 3e-5  # the 31.7 h schedule in about 3.4 s
    backend = Backend(refuse=1.0, streak=ATTEMPTS + 1)  # a 503, or a dropped connection, every time
    await backend.start()
    server = Server(database_url, outbound_env(backend, local_stripe, scale=scale))
    await asyncio.to_thread(server.start)
    try:
        async with Paystream(server) as ps:
            pi = trigger.stripe_id("pi_")
            base = int(time.time()) - 100
            for i, step in enumerate(["payment_intent.created", "payment_intent.succeeded"]):
                await ps.deliver(ps.event(step, pi, created=base + i))
            txn = await db.fetchval("SELECT id FROM transactions WHERE stripe_id = $1", pi)
            keys = [(txn, 1), (txn, 2)]

            async def both_failed() -> bool:
                return await db.fetchval("SELECT count(*) FROM outbound_deliveries WHERE transaction_id = $1"
                                         " AND failed_at IS NOT NULL", txn) == 2

            await wait_until(both_failed, timeout=30, what="both deliveries to be given up")
            tries = {k: [r for r in backend.requests if r.key == k] for k in keys}
            assert [len(tries[k]) for k in keys] == [ATTEMPTS, ATTEMPTS]
            assert max(r.n for r in tries[keys[0]]) < min(r.n for r in tries[keys[1]]), "seq 2 waited for seq 1"
            for k in keys:  # each wait at least the schedule's (jittered) delay
                gaps = [b.at - a.at for a, b in zip(tries[k], tries[k][1:], strict=False)]
                for gap, nominal in zip(gaps, RETRY_DELAYS, strict=True):
                    assert gap >= nominal * scale * (1 - JITTER), (gaps, nominal)
                assert sum(gaps) >= sum(RETRY_DELAYS) * scale * (1 - JITTER)
            assert all(r.answer in (503, None) for k in keys for r in tries[k])

            failed = {r["webhook_id"]: r for r in await paystream_cli(database_url, "failed", "--limit", "1000")}
            for k in keys:
                row = failed[webhook_id(*k)]
                assert (row["state"], row["attempts"], row["transaction_id"], row["seq"]) == ("failed", ATTEMPTS, *k)
                assert row["last_status"] == 503 or row["last_status"] is None
                assert row["last_error"] and row["failed_at"] and row["type"].startswith("transaction.")

            async def failed_gauge() -> bool:
                return (await scrape(server, "paystream_outbound_failed") or 0) >= 2

            await wait_until(failed_gauge, timeout=15, what="/metrics to count the failed deliveries")
            assert (await scrape(server, 'paystream_outbound_attempts_total{result="failed"}') or 0) >= 2.0

            # The backend is fixed: replay both (by webhook-id, and by id), named seq 2 first: they
            # are queued in seq order all the same.
            backend.refuse = 0.0
            before = len(backend.requests)
            replayed = await paystream_cli(database_url, "--replay", webhook_id(txn, 2),
                                     "--replay", str(failed[webhook_id(txn, 1)]["id"]))
            assert [(r["seq"], r["state"], r["attempts"]) for r in replayed] == [(1, "pending", 0), (2, "pending", 0)]

            async def both_delivered() -> bool:
                return set(backend.accepted(set(keys))) == set(keys)

            await wait_until(both_delivered, timeout=15, what="the replays to be delivered")
            again = backend.requests[before:]
            assert [(r.key, r.webhook_id) for r in again] == [(k, webhook_id(*k)) for k in keys], "in seq order"
            delivered = {r["webhook_id"]: r for r in await paystream_cli(database_url, "delivered", "--limit", "1000")}
            assert all(delivered[webhook_id(*k)]["attempts"] == 1 for k in keys)

            # A delivered one can be sent again too: same webhook-id.
            await paystream_cli(database_url, "--replay", webhook_id(txn, 2))
            async def sent_again() -> bool:  # arrived and answered (the backend works a while first)
                return len(backend.requests) > before + 2 and backend.requests[-1].answer is not None

            await wait_until(sent_again, what="a second replay")
            assert backend.requests[-1].webhook_id == webhook_id(txn, 2) and backend.requests[-1].accepted
            out = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "paystream", "deliveries", "--replay", "msg_none_1"],
                capture_output=True, text=True, env={**os.environ, "DATABASE_URL": database_url})
            assert out.returncode == 1 and "no delivery 'msg_none_1'" in out.stderr
    finally:
        server.stop()
        await backend.stop()


@pytest.mark.parametrize(("env", "named"), [
    ({"PAYSTREAM_OUTBOUND_URL": "http://127.0.0.1:9/hooks"}, "PAYSTREAM_OUTBOUND_SECRET"),
    ({"PAYSTREAM_OUTBOUND_URL": "http://127.0.0.1:9/hooks", "PAYSTREAM_OUTBOUND_SECRET": "whsec_tooshort"},
     "PAYSTREAM_OUTBOUND_SECRET"),
])
def test_serve_refuses_outbound_settings_that_cannot_work(database_url: str, env: dict[str, str], named: str) -> None:
    server = Server(database_url, env)
    out = subprocess.run([sys.executable, "-m", "paystream", "serve", "--port", str(server.port)],
                         env=server.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], out.stderr
    assert env.get("PAYSTREAM_OUTBOUND_SECRET", "@@") not in out.stderr


# --- kinds subscription and checkout (issue 23) ------------------------------------------


async def test_every_logged_event_of_a_subscription_and_a_checkout_session_reaches_the_backend_once_in_order(
        isolated: tuple[str, asyncpg.Connection]) -> None:
    """A subscription's whole life (incomplete, active once the page pays, past_due on a
    failed renewal, active on its paid retry, canceled at period end, then now) and a
    Checkout Session paid by a delayed method (processing, then succeeded), driven
    through the emulator whose webhooks reach this server alone: every event logged for
    them and for the invoices and PaymentIntent they made reaches the merchant's backend
    signed, accepted once per webhook-id, in seq order, while the backend refuses some."""
    database_url, db = isolated  # its own: other servers must not make its reads against their emulators
    backend = Backend(refuse=0.3)
    await backend.start()
    with own_emulator(lost=False) as emulator:
        server = Server(database_url, outbound_env(backend, emulator, scale=0.0005))
        try:
            await asyncio.to_thread(server.start)
            emulator.register_webhook(f"{server.base_url}/v1/stripe/webhook", server.webhook_secret)
            async with Paystream(server) as ps, Stripe(emulator.url) as stripe:
                async def reaches(any_id: str, **fields: object) -> dict:
                    async def there() -> dict | None:
                        body = (await ps.get(any_id)).json()
                        return body if all(body.get(k) == v for k, v in fields.items()) else None
                    return await wait_until(there, timeout=20, what=f"{any_id} with {fields}")

                customer, price = await stripe.customer(), await stripe.monthly_price(1700)
                resp = await ps.http.post("/v1/transactions", headers=ps.backend, json={
                    "kind": "subscription", "customer_id": customer, "price": price})
                assert resp.status_code == 201, resp.text
                sub_txn, secret = resp.json()["transaction"], resp.json()["client_secret"]
                sub = sub_txn["stripe_id"]
                assert (await stripe.pay(secret.split("_secret_")[0], VISA))["status"] == "succeeded"
                await reaches(sub, status="active")
                await stripe.default_card(customer, DECLINED)
                renewal = await stripe.post("/v1/invoices", customer=customer, subscription=sub)
                assert (await stripe.http.post(f"/v1/invoices/{renewal['id']}/pay")).status_code == 402
                await reaches(sub, status="past_due")
                await stripe.default_card(customer, VISA)
                assert (await stripe.http.post(f"/v1/invoices/{renewal['id']}/pay")).status_code == 200
                await reaches(sub, status="active", last_error=None)
                cancel = f"/v1/transactions/{sub_txn['id']}/cancel"
                assert (await ps.http.post(cancel, headers=ps.backend, json={"at_period_end": True})).status_code == 200
                assert (await ps.http.post(cancel, headers=ps.backend)).status_code == 200
                await reaches(sub, status="canceled")

                resp = await ps.http.post("/v1/transactions", headers=ps.backend, json={
                    "kind": "checkout", "mode": "payment", "amount": 4200, "currency": "eur", **URLS})
                assert resp.status_code == 201, resp.text
                session_txn = resp.json()["transaction"]
                session = session_txn["stripe_id"]
                await stripe.complete(session, iban=IBAN_OK)
                await reaches(session, status="succeeded")

                invoices = (await stripe.http.get("/v1/invoices", params={"subscription": sub})).json()["data"]
                pi = (await stripe.http.get(f"/v1/checkout/sessions/{session}")).json()["payment_intent"]
                objects = [sub, session, pi, *(i["id"] for i in invoices)]
                assert len(objects) == 5

                async def quiet() -> bool:
                    """Every event the emulator posted is applied and every read it asked for made."""
                    posted = [e["id"] for e in await stripe.events() if is_supported(e["type"])]
                    applied = await db.fetchval("SELECT count(*) FROM stripe_events WHERE id = ANY($1)"
                                                " AND processed_at IS NOT NULL", posted)
                    reading = await db.fetchval("SELECT count(*) FROM outbox o JOIN transactions t"
                                                " ON t.id = o.transaction_id WHERE t.stripe_id = ANY($1)"
                                                " AND o.done_at IS NULL", objects)
                    return applied == len(posted) and reading == 0

                await wait_until(quiet, timeout=30, what="the emulator's events applied")
                want = await logged(db, objects)
                assert {k[0] for k in want} == set(
                    await db.fetchval("SELECT array_agg(id) FROM transactions WHERE stripe_id = ANY($1)", objects))

                async def all_received() -> bool:
                    return set(backend.accepted(set(want))) == set(want)

                await wait_until(all_received, timeout=45, what="every logged event at the backend")
            got = backend.accepted(set(want))
            assert all(r.body is not None for r in backend.requests), "every message verifies"
            for key, request in got.items():
                assert request.body["type"] == f"transaction.{want[key]['status']}"
                assert request.body["data"] == want[key]["data"]
                assert request.webhook_id == webhook_id(*key)
            mine = [r for r in backend.requests if r.key in want]
            accepted = [r.key for r in mine if r.accepted]
            assert sorted(accepted) == sorted(want), "each logged event accepted exactly once"
            for (txn, seq), first in got.items():
                later = [r.n for r in mine if r.key == (txn, seq + 1)]
                assert not later or min(later) > first.n, f"{txn}: seq {seq + 1} was sent before seq {seq}"
            lives: dict[str, list[str]] = {}  # each transaction's statuses as delivered, a repeat once
            for (txn, _seq), event in sorted(want.items()):
                life = lives.setdefault(txn, [])
                if not life or life[-1] != event["status"]:
                    life.append(event["status"])
            assert lives[sub_txn["id"]] == ["incomplete", "active", "past_due", "active", "canceled"]
            assert lives[session_txn["id"]] == ["requires_payment_method", "processing", "succeeded"]
            assert any(r.answer != 204 for r in mine), "the backend refused some attempts"
            rows = await db.fetch("SELECT delivered_at IS NOT NULL AS done FROM outbound_deliveries d"
                                  " JOIN transactions t ON t.id = d.transaction_id WHERE t.stripe_id = ANY($1)",
                                  objects)
            assert len(rows) == len(want)

            # The worker records a delivery after the backend's answer reaches it: the last
            # one may be accepted here a moment before its row says so.
            async def recorded() -> bool:
                return await db.fetchval(
                    "SELECT bool_and(delivered_at IS NOT NULL) FROM outbound_deliveries d"
                    " JOIN transactions t ON t.id = d.transaction_id WHERE t.stripe_id = ANY($1)", objects)

            await wait_until(recorded, timeout=15, what="every delivery recorded as delivered")
        finally:
            server.stop()
            await backend.stop()
