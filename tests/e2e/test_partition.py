"""A network partition between a paystream node and Postgres.

The node runs in a network namespace of its own, reached over two veth pairs that this
test creates (and removes, whatever happens):

    test process (root namespace)                       namespace `psp-<tag>`
    HTTP clients ── 10.213.K.1 ═══ veth pc<tag>h/n ═══ 10.213.K.2:<port>  paystream serve
    relay 10.213.K.5:<p> ══════════ veth pd<tag>h/n ═══ 10.213.K.6         (DATABASE_URL → relay)
      └─ → Postgres on loopback (or the embedded one's unix socket)

Postgres listens on loopback only, so a small TCP relay in this process (on a thread of
its own) carries the node's connections to it.  Cutting the link is `ip link set pd<tag>h
down`: packets stop and connections hang, as in a real partition (nothing is reset; fixed
neighbour entries keep ARP from failing, so new connections hang too).  20 browsers wait
on SSE and Stripe sends webhooks while it is cut for CUT_SECONDS; then it comes back.
What was measured is kept in tests/artifacts/partition.json.

Where network namespaces cannot be made (not root, no iproute2) the test is skipped, or,
under CI (the CI environment variable set), it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from paystream.dev import trigger
from paystream.dev.processes import wait_until_up
from paystream.ingest.webhooks import WEBHOOK_DEADLINE
from tests.conftest import ARTIFACTS, Server
from tests.support import Paystream

pytestmark = pytest.mark.e2e

CUT_SECONDS = 10.0
NOTICE_WITHIN = 5.0  # /readyz must answer 503 this soon after the cut
READY_AGAIN_WITHIN = 20.0  # and 200 again this soon after the browsers are served once it mends
# What a webhook sender waits for an answer (tests.support.Paystream's client timeout).  A
# webhook the node cannot commit must be refused (5xx) before it, never left hanging.
REQUEST_TIMEOUT = 15.0
ANSWER_WITHIN = WEBHOOK_DEADLINE + 4  # the node's own bound, with room for a busy machine
BROWSERS = 20
STEPS = ["payment_intent.created", "payment_intent.requires_action", "payment_intent.processing",
         "payment_intent.succeeded"]


# --- the network ---------------------------------------------------------------------------

def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and proc.returncode != 0:
        raise IpFailed(f"`ip {' '.join(args)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc


def _mac(device: str, netns: str | None = None) -> str:
    args = ("-n", netns) if netns else ()
    return json.loads(_ip(*args, "-j", "link", "show", device).stdout)[0]["address"]


class IpFailed(Exception):
    """An `ip` command failed (while setting up: this machine or user cannot make
    network namespaces and veth pairs)."""


@dataclass
class Partitionable:
    """A network namespace with a client link and a database link, both /30s in
    10.213.K.0/29 (K chosen free on this host)."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    made_netns: bool = False
    made_links: list[str] = field(default_factory=list)  # host ends of the veth pairs made

    def __post_init__(self) -> None:
        self.netns = f"psp-{self.tag}"
        self.client_host, self.client_ns = f"pc{self.tag}h", f"pc{self.tag}n"
        self.db_host, self.db_ns = f"pd{self.tag}h", f"pd{self.tag}n"
        self.k = 0

    def create(self) -> Partitionable:
        if not sys.platform.startswith("linux") or shutil.which("ip") is None:
            raise IpFailed("needs Linux and iproute2's `ip`")
        used = _ip("-4", "-o", "addr", "show").stdout
        free = [k for k in range(1, 255) if f" 10.213.{k}." not in used]
        self.k = random.choice(free)
        _ip("netns", "add", self.netns)
        self.made_netns = True
        _ip("-n", self.netns, "link", "set", "lo", "up")
        for host_end, ns_end, base in ((self.client_host, self.client_ns, 0), (self.db_host, self.db_ns, 4)):
            _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end, "netns", self.netns)
            self.made_links.append(host_end)
            _ip("addr", "add", f"10.213.{self.k}.{base + 1}/30", "dev", host_end)
            _ip("-n", self.netns, "addr", "add", f"10.213.{self.k}.{base + 2}/30", "dev", ns_end)
            _ip("link", "set", host_end, "up")
            _ip("-n", self.netns, "link", "set", ns_end, "up")
        # Fixed neighbour entries on the database link: without them, ARP failing while it
        # is cut would turn the silence into quick "No route to host" errors.  Across a
        # routed network a partition is silence: new connections hang too.
        _ip("-n", self.netns, "neigh", "replace", self.relay_address, "lladdr", _mac(self.db_host),
            "dev", self.db_ns, "nud", "permanent")
        _ip("neigh", "replace", f"10.213.{self.k}.6", "lladdr", _mac(self.db_ns, self.netns),
            "dev", self.db_host, "nud", "permanent")
        return self

    @property
    def node_address(self) -> str:  # where clients reach the node
        return f"10.213.{self.k}.2"

    @property
    def relay_address(self) -> str:  # where the node reaches Postgres (through the relay)
        return f"10.213.{self.k}.5"

    def cut(self) -> None:
        _ip("link", "set", self.db_host, "down")

    def mend(self) -> None:
        _ip("link", "set", self.db_host, "up")

    def remove(self) -> None:
        # Deleting the namespace deletes the veth ends in it, and so both pairs; the host
        # ends are deleted too in case the namespace never got them.
        for host_end in self.made_links:
            _ip("link", "del", host_end, check=False)
        if self.made_netns:
            _ip("netns", "del", self.netns, check=False)


@pytest.fixture
def network() -> Iterator[Partitionable]:
    net = Partitionable()
    try:
        net.create()
    except (IpFailed, OSError, subprocess.SubprocessError) as exc:
        net.remove()
        reason = f"cannot create a network namespace with veth pairs: {exc}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
        pytest.skip(reason)
    try:
        yield net
    finally:
        net.remove()


class Relay:
    """A TCP relay from `listen` to Postgres (host, port) or a unix socket path, run on
    a thread and event loop of its own, so the test's awaits never stall it."""

    def __init__(self, listen: str, target: tuple[str, int] | str) -> None:
        self.listen, self.target = listen, target
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pg-relay", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> Relay:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, self.listen, 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if isinstance(self.target, str):
                up_reader, up_writer = await asyncio.open_unix_connection(self.target)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()  # the protocol has no half-close: one side ending ends both

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()


def relay_target(database_url: str) -> tuple[str, int] | str:
    """Where the relay connects: Postgres' TCP address, or the embedded one's unix socket."""
    parts = urlsplit(database_url)
    query = parse_qs(parts.query)
    if "host" in query:  # the embedded Postgres: a unix socket directory
        return os.path.join(query["host"][0], f".s.PGSQL.{parts.port or 5432}")
    return parts.hostname or "127.0.0.1", parts.port or 5432


def through(database_url: str, host: str, port: int) -> str:
    """The same database, reached at host:port (the relay)."""
    parts = urlsplit(database_url)
    user = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=(user + "@" if user else "") + f"{host}:{port}", query=""))


class NodeInNamespace(Server):
    """`paystream serve` started inside the namespace, bound to the client link."""

    def __init__(self, database_url: str, net: Partitionable, extra_env: dict[str, str]) -> None:
        super().__init__(database_url, extra_env)
        self.net = net
        self.base_url = f"http://{net.node_address}:{self.port}"

    def start(self, timeout: float = 30) -> NodeInNamespace:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # `ip netns exec` execs the command: proc is the server itself
                ["ip", "netns", "exec", self.net.netns, sys.executable, "-m", "paystream", "serve",
                 "--host", self.net.node_address, "--port", str(self.port)],
                env=self.env, stdout=log, stderr=log)
        wait_until_up(self.proc, f"{self.base_url}/readyz", timeout, self.log_tail)
        return self


@pytest.fixture
def node(network: Partitionable, database_url: str) -> Iterator[NodeInNamespace]:
    relay = Relay(network.relay_address, relay_target(database_url))
    server = None
    try:
        relay.start()
        server = NodeInNamespace(through(database_url, network.relay_address, relay.port), network, {
            "PAYSTREAM_SSE_PING": "1",
            # Nothing here calls Stripe; should anything try, it stays inside the namespace.
            "STRIPE_API_BASE": "http://127.0.0.1:9",
        })
        server.start()
        yield server
    finally:
        with contextlib.suppress(Exception):
            network.mend()  # a failure mid-cut must not leave the node stopping slowly
        if server is not None:
            server.stop(timeout=10)
        relay.stop()


# --- Stripe and the browsers ---------------------------------------------------------------

@dataclass
class Attempt:
    event_id: str
    started: float
    took: float
    status: int | None  # None: no answer within REQUEST_TIMEOUT (or the connection failed)


async def send_like_stripe(ps: Paystream, event: dict, attempts: list[Attempt], give_up: float) -> None:
    """POST until a 2xx, retrying (faster than Stripe) after a refusal or a timeout."""
    delay = 0.1
    while True:
        started = time.monotonic()
        status = None
        with contextlib.suppress(httpx.TransportError):
            body = trigger.encode(event)
            resp = await ps.http.post("/v1/stripe/webhook", content=body, timeout=REQUEST_TIMEOUT, headers={
                "Content-Type": "application/json",
                "Stripe-Signature": trigger.sign(body, ps.server.webhook_secret)})
            status = resp.status_code
        attempts.append(Attempt(event["id"], started, time.monotonic() - started, status))
        if status == 200:
            return
        if time.monotonic() > give_up:
            raise AssertionError(f"{event['id']} never accepted")
        await asyncio.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 1.0)


@dataclass
class Browser:
    """An EventSource: it reads a stream; when the stream ends before the final state, or
    the connection fails or is refused, it waits `retry` and reconnects with Last-Event-ID."""

    pi: str
    seen: list[tuple[int, str]] = field(default_factory=list)  # (seq, status), as received
    connects: int = 0
    final_at: float | None = None
    first: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, ps: Paystream) -> None:
        token = ps.token(self.pi)
        retry = 1.0
        while True:
            last = self.seen[-1][0] if self.seen else None
            with contextlib.suppress(httpx.TransportError):
                self.connects += 1
                async with ps.sse(self.pi, token=token, last_event_id=last) as stream:
                    if stream.response.status_code == 200:
                        while (frame := await stream.frame(timeout=60)) is not None:
                            if frame.retry is not None:
                                retry = frame.retry / 1000
                            if frame.event is None:
                                continue
                            status = frame.json["status"]
                            self.seen.append((int(frame.id), status))
                            self.first.set()
                            if status == "succeeded":
                                self.final_at = time.monotonic()
                                return
            await asyncio.sleep(retry)


# --- the test ------------------------------------------------------------------------------

class Watch:
    """What an operator's probes see, sampled from just before the cut to the end:
    /readyz (one request at a time, as a probe) and paystream_listener_up in /metrics.
    `ready_again` is set by the first 200 from /readyz after `mended_at`."""

    def __init__(self, ps: Paystream) -> None:
        self.ps = ps
        self.readyz: list[tuple[float, int | None]] = []  # (answered at, status)
        self.listener: list[tuple[float, bool]] = []  # (answered at, up)
        self.stop = asyncio.Event()
        self.mended_at: float | None = None
        self.ready_again = asyncio.Event()

    async def run(self) -> None:
        await asyncio.gather(self._readyz(), self._listener())

    async def _readyz(self) -> None:
        while not self.stop.is_set():
            status = None
            with contextlib.suppress(httpx.TransportError):
                status = (await self.ps.http.get("/readyz", timeout=REQUEST_TIMEOUT)).status_code
            at = time.monotonic()
            self.readyz.append((at, status))
            if status == 200 and self.mended_at is not None and at > self.mended_at:
                self.ready_again.set()
            await asyncio.sleep(0.1)

    async def _listener(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(httpx.TransportError):  # a missed sample, as for /readyz
                text = (await self.ps.http.get("/metrics", timeout=REQUEST_TIMEOUT)).text
                [line] = [m for m in text.splitlines() if m.startswith("paystream_listener_up ")]
                self.listener.append((time.monotonic(), float(line.split()[1]) == 1))
            await asyncio.sleep(0.1)


def first_after(samples: list[tuple[float, object]], since: float, value: object) -> float | None:
    return next((at - since for at, seen in samples if at > since and seen == value), None)


async def test_node_cut_off_from_postgres(node: NodeInNamespace, network: Partitionable,
                                          database_url: str) -> None:
    base = int(time.time()) - 100
    pis = [trigger.stripe_id("pi_") for _ in range(BROWSERS)]
    events = {pi: [trigger.build(step, pi, created=base + i) for i, step in enumerate(STEPS)] for pi in pis}
    attempts: list[Attempt] = []

    async with Paystream(node) as ps:
        # Before: every payment exists and has moved once; a browser waits on each.
        await asyncio.gather(*(ps.deliver(events[pi][0]) for pi in pis))
        browsers = [Browser(pi) for pi in pis]
        watching = [asyncio.create_task(b.run(ps)) for b in browsers]
        watch = Watch(ps)
        probes = asyncio.create_task(watch.run())
        try:
            await asyncio.wait_for(asyncio.gather(*(b.first.wait() for b in browsers)), 15)
            await asyncio.gather(*(ps.deliver(events[pi][1]) for pi in pis))

            async def stripe(pi: str, delay: float) -> None:
                await asyncio.sleep(delay)  # spread over the cut, from just before it
                for event in events[pi][2:]:
                    await send_like_stripe(ps, event, attempts, give_up=time.monotonic() + 45)

            senders = [asyncio.create_task(stripe(pi, random.uniform(0, CUT_SECONDS * 0.7))) for pi in pis]
            await asyncio.sleep(0.2)  # a few webhooks are in flight when the link goes
            await asyncio.to_thread(network.cut)
            cut_at = time.monotonic()
            await asyncio.sleep(CUT_SECONDS)
            await asyncio.to_thread(network.mend)
            watch.mended_at = mended_at = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*senders), 45)
            await asyncio.wait_for(asyncio.gather(*watching), 30)
            # The browsers can finish before /readyz says 200 again: the listener catches
            # them up as soon as it reconnects, and only then checks that it hears its own
            # NOTIFY.  Probe on until it does (or READY_AGAIN_WITHIN passes: the assert below).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watch.ready_again.wait(), READY_AGAIN_WITHIN)
            watch.stop.set()
            await asyncio.wait_for(probes, REQUEST_TIMEOUT + 5)
        finally:
            for task in (*watching, probes):
                task.cancel()

    # What it showed (also kept in tests/artifacts/partition.json).
    in_cut = [a for a in attempts if cut_at <= a.started < mended_at]
    refused = [a for a in attempts if a.status != 200]
    report = {
        "backend": "embedded" if "host=" in database_url else "system",
        "cut_seconds": CUT_SECONDS,
        "readyz_503_after_cut_s": first_after(watch.readyz, cut_at, 503),
        "listener_down_after_cut_s": first_after(watch.listener, cut_at, False),
        "readyz_200_after_mend_s": first_after(watch.readyz, mended_at, 200),
        "listener_up_after_mend_s": first_after(watch.listener, mended_at, True),
        "webhook_attempts": len(attempts),
        "webhook_attempts_started_in_cut": len(in_cut),
        "webhook_refusals": {str(status): sum(a.status == status for a in attempts)
                             for status in sorted({a.status for a in refused}, key=str)},
        "webhook_refusal_answer_s_max": max((a.took for a in refused), default=None),
        "webhook_answer_s_max": max(a.took for a in attempts),
        "all_browsers_final_after_mend_s": max(b.final_at or float("inf") for b in browsers) - mended_at,
        "browser_connects": sum(b.connects for b in browsers),
        "attempts": [(round(a.started - cut_at, 2), round(a.took, 2), a.status) for a in attempts],
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "partition.json").write_text(json.dumps(report, indent=1))
    summary = {k: v for k, v in report.items() if k != "attempts"}

    # The node noticed within NOTICE_WITHIN seconds, and was ready again after the link returned.
    assert (report["readyz_503_after_cut_s"] or 99) <= NOTICE_WITHIN, summary
    assert (report["listener_down_after_cut_s"] or 99) <= NOTICE_WITHIN, summary
    assert report["readyz_200_after_mend_s"] is not None, summary
    # Webhooks it could not commit were refused with a 5xx, within the node's deadline (well
    # inside the request timeout); none hung.  Those sent while the link was down were all refused.
    assert in_cut and refused, summary
    assert all(a.status is not None and 500 <= a.status <= 599 for a in refused), summary
    assert report["webhook_answer_s_max"] <= ANSWER_WITHIN, summary
    assert all(a.status != 200 for a in in_cut if a.started + a.took < mended_at), summary

    # Every webhook was applied once, retries and all.
    conn = await asyncpg.connect(database_url)
    try:
        ids = [e["id"] for pi in pis for e in events[pi]]
        stored = await conn.fetch("SELECT id, processed_at IS NOT NULL AS done, outcome FROM stripe_events"
                                  " WHERE id = ANY($1)", ids)
        assert len(stored) == len(ids) and all(r["done"] for r in stored), stored
        assert {r["outcome"] for r in stored} == {"applied"}, stored
        rows = await conn.fetch(
            "SELECT t.stripe_id, t.status, t.seq, array_agg(e.seq ORDER BY e.seq) AS seqs,"
            " array_agg(e.status ORDER BY e.seq) AS statuses, array_agg(e.stripe_event_id ORDER BY e.seq) AS causes"
            " FROM transactions t JOIN transaction_events e ON e.transaction_id = t.id"
            " WHERE t.stripe_id = ANY($1) GROUP BY 1, 2, 3", pis)
        assert len(rows) == len(pis)
        logs = {}
        for r in rows:  # one logged change per Stripe event: none lost, none applied twice
            assert r["status"] == "succeeded" and r["seq"] == 4 and r["seqs"] == [1, 2, 3, 4], dict(r)
            assert r["causes"] == [e["id"] for e in events[r["stripe_id"]]], dict(r)
            logs[r["stripe_id"]] = list(zip(r["seqs"], r["statuses"], strict=True))
    finally:
        await conn.close()
    # Every browser got every logged state once, in order, ending at the final one.
    for b in browsers:
        assert b.seen == logs[b.pi], (b.pi, b.seen, logs[b.pi])
