"""Behind PgBouncer in transaction mode: DATABASE_URL through the pooler, PAYSTREAM_LISTEN_URL
straight to Postgres, and paystream works unchanged."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from paystream.dev import trigger
from paystream.dev.localstripe import LocalStripe
from paystream.dev.processes import free_port
from tests.conftest import Server
from tests.harness import stop_process, tail
from tests.support import Paystream, wait_until

pytestmark = pytest.mark.e2e


def _pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        reason = "pgbouncer is not installed and apt-get (as root) is unavailable to install it"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    done = subprocess.run([apt, "install", "-y", "-q", "pgbouncer"], capture_output=True, text=True,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=300)
    found = shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin:/usr/bin")
    if done.returncode != 0 or not found:
        reason = f"apt-get install pgbouncer failed: {(done.stderr or done.stdout)[-500:]}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


class PgBouncer:
    """PgBouncer in transaction mode on a free port, in front of the test's Postgres."""

    def __init__(self, host: str, port: int) -> None:
        self.binary = _pgbouncer_binary()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="paystream-pgbouncer-"))
        self.dir.chmod(0o777)  # pgbouncer drops root for nobody; it writes its log and pid here
        (self.dir / "users.txt").write_text('"postgres" ""\n')
        (self.dir / "pgbouncer.ini").write_text(f"""\
[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir}/users.txt
pool_mode = transaction
; few server sessions for many clients: every transaction may land on another one
default_pool_size = 4
max_client_conn = 200
logfile = {self.dir}/pgbouncer.log
pidfile = {self.dir}/pgbouncer.pid
""")
        for f in self.dir.iterdir():
            f.chmod(0o666)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PgBouncer:
        as_user = ["-u", "nobody"] if os.geteuid() == 0 else []  # it refuses to run as root
        self.proc = subprocess.Popen([self.binary, *as_user, str(self.dir / "pgbouncer.ini")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                asyncio.run(self._ping())
                return self
            except (OSError, asyncpg.PostgresError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"pgbouncer did not start: {self.log_tail()}") from None
                time.sleep(0.1)

    async def _ping(self) -> None:
        conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres",
                                     timeout=2, statement_cache_size=0)
        try:
            await conn.execute("SELECT 1")
        finally:
            await conn.close()

    def url(self, database_url: str) -> str:
        return urlunsplit(urlsplit(database_url)._replace(netloc=f"postgres@127.0.0.1:{self.port}"))

    def log_tail(self) -> str:
        return tail(self.dir / "pgbouncer.log", 20)

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def pgbouncer(database_url: str) -> Iterator[PgBouncer]:
    parts = urlsplit(database_url)
    if not parts.hostname or parts.hostname.startswith("/"):
        pytest.skip("this Postgres is on a unix socket (embedded): PgBouncer is put in front of a TCP one")
    bouncer = PgBouncer(parts.hostname, parts.port or 5432)
    try:
        yield bouncer.start()
    finally:
        bouncer.stop()


def _env(pgbouncer: PgBouncer, database_url: str, local_stripe: LocalStripe, **extra: str) -> dict[str, str]:
    return {"DATABASE_URL": pgbouncer.url(database_url), "PAYSTREAM_DB_POOLER": "transaction",
            "STRIPE_API_BASE": local_stripe.url, "PAYSTREAM_DB_POOL": "6", "PAYSTREAM_SSE_PING": "1", **extra}


async def test_pool_through_pgbouncer_listen_direct(pgbouncer: PgBouncer, database_url: str,
                                                    local_stripe: LocalStripe) -> None:
    srv = Server(database_url, _env(pgbouncer, database_url, local_stripe, PAYSTREAM_LISTEN_URL=database_url))
    srv.start()
    try:
        async with Paystream(srv) as ps:
            assert (await ps.http.get("/readyz")).json()["checks"] == {
                "database": True, "listener": True, "schema": True}
            # Signed webhook -> SSE push, and the reads.
            pi, now = trigger.stripe_id("pi_"), int(time.time())
            await ps.deliver(ps.event("payment_intent.created", pi, created=now))
            async with ps.sse(pi) as stream:
                assert (await stream.event()).json["seq"] == 1
                await ps.deliver(ps.event("payment_intent.requires_action", pi, created=now + 1))
                assert (await stream.event()).json["status"] == "requires_action"
                waiting = asyncio.create_task(ps.get(pi, **{"await": "succeeded", "timeout": "20"}))
                await asyncio.sleep(0.3)  # the long-poll is waiting
                await ps.deliver(ps.event("payment_intent.succeeded", pi, created=now + 2))
                frames = await stream.rest()
            assert [(f.id, f.json["status"]) for f in frames] == [("3", "succeeded")]
            body = (await asyncio.wait_for(waiting, 10)).json()
            assert (body["status"], body["seq"], body["timed_out"]) == ("succeeded", 3, False)
            assert (await ps.get(pi)).json()["status"] == "succeeded"

            # Several concurrent webhooks, on more transactions than PgBouncer has server sessions.
            pis = [trigger.stripe_id("pi_") for _ in range(12)]
            for i, kind in enumerate(("payment_intent.processing", "payment_intent.succeeded")):
                answers = await asyncio.gather(*(ps.send(ps.event(kind, p, created=now + i)) for p in pis))
                assert [a.status_code for a in answers] == [200] * len(pis), [a.text for a in answers]
            states = [(await ps.get(p)).json() for p in pis]
            assert {(s["status"], s["seq"]) for s in states} == {("succeeded", 2)}
    finally:
        srv.stop()
    log = srv.log_path.read_text()
    assert "prepared statement" not in log, srv.log_tail()


async def test_listen_through_a_transaction_pooler_is_reported_not_silent(
        pgbouncer: PgBouncer, database_url: str, local_stripe: LocalStripe) -> None:
    """The mistake this guards against: no PAYSTREAM_LISTEN_URL, so LISTEN goes through
    PgBouncer in transaction mode too, where it is accepted and hears nothing."""
    srv = Server(database_url, _env(pgbouncer, database_url, local_stripe))
    try:
        # Up (it answers), but not ready: the listener never heard its own NOTIFY.
        await asyncio.to_thread(srv.start, 30, lambda r: r.status_code == 503)
        await wait_until(lambda: _logged(srv, "LISTEN through a transaction pooler?"), timeout=15,
                         what="the pooler warning")
        async with Paystream(srv) as ps:
            answer = await ps.http.get("/readyz")
            assert answer.status_code == 503
            assert answer.json()["checks"] == {"database": True, "listener": False, "schema": True}
    finally:
        srv.stop()


async def _logged(srv: Server, text: str) -> bool:
    return text in srv.log_path.read_text()


async def test_a_transaction_pooler_nobody_declared_is_detected(pgbouncer: PgBouncer, database_url: str,
                                                                local_stripe: LocalStripe) -> None:
    """The operator missed PAYSTREAM_DB_POOLER=transaction: paystream finds the pooler at
    start, says so, and runs without prepared statements instead of answering 500s."""
    env = _env(pgbouncer, database_url, local_stripe, PAYSTREAM_LISTEN_URL=database_url)
    del env["PAYSTREAM_DB_POOLER"]
    srv = Server(database_url, env)
    srv.start()
    try:
        async with Paystream(srv) as ps:
            now = int(time.time())
            pis = [trigger.stripe_id("pi_") for _ in range(60)]
            for i, kind in enumerate(("payment_intent.processing", "payment_intent.succeeded")):
                answers = await asyncio.gather(*(ps.send(ps.event(kind, p, created=now + i)) for p in pis))
                assert [a.status_code for a in answers] == [200] * len(pis), [a.text for a in answers][:3]
            states = [(await ps.get(p)).json() for p in pis]
            assert {(s["status"], s["seq"]) for s in states} == {("succeeded", 2)}
    finally:
        srv.stop()
    log = srv.log_path.read_text()
    assert "prepared statement" not in log, srv.log_tail()
    assert "transaction-mode pooler" in log and "PAYSTREAM_DB_POOLER=transaction" in log, srv.log_tail()
