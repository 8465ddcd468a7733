"""`paystream …` as an operator runs it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from paystream.auth import tokens
from paystream.dev import trigger
from tests import harness
from tests.conftest import Server
from tests.support import Paystream

pytestmark = pytest.mark.e2e


def paystream(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "paystream", *args], capture_output=True, text=True,
                          env=env if env is not None else dict(os.environ), timeout=timeout)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("STRIPE_API_KEY", "STRIPE_WEBHOOK_SECRET", "PAYSTREAM_API_KEY",
                        "PAYSTREAM_TOKEN_SECRET", "DATABASE_URL")}
    env["PAYSTREAM_DATA_DIR"] = "/nonexistent/paystream-test"
    return {**env, **extra}


def test_serve_refuses_without_its_secrets_and_names_them() -> None:
    result = paystream("serve", env=clean_env(PAYSTREAM_API_KEY="k"))
    assert result.returncode == 2
    for name in ("STRIPE_API_KEY", "STRIPE_WEBHOOK_SECRET", "PAYSTREAM_TOKEN_SECRET"):
        assert name in result.stderr
    assert "PAYSTREAM_API_KEY" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("name", "value", "says"), [
    ("PAYSTREAM_TRUSTED_PROXIES", "10.0.0.0/33", "not an IP address or a network"),
    ("PAYSTREAM_BROKER", "redis://127.0.0.1:6379", "should match pattern"),
    ("PAYSTREAM_DRAIN_SECONDS", "-1", "greater than or equal to 0"),
])
def test_a_bad_setting_is_refused_in_one_line_naming_it(name: str, value: str, says: str) -> None:
    result = paystream("serve", env=clean_env(**{name: value}))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr  # one line
    assert name in result.stderr and repr(value) in result.stderr and says in result.stderr
    assert "Traceback" not in result.stderr


def test_help_names_every_command() -> None:
    out = paystream("--help").stdout
    for command in ("dev", "serve", "migrate", "token", "trigger"):
        assert command in out
    assert "payment_intent.succeeded" in paystream("trigger", "--help").stdout


def test_token_mints_a_verifiable_token() -> None:
    secret = "t" * 32
    result = paystream("token", "--txn", "pi_1", "--txn", "txn_2", "--ttl", "60",
                       env=clean_env(PAYSTREAM_TOKEN_SECRET=secret))
    assert result.returncode == 0, result.stderr
    grant = tokens.verify(secret, result.stdout.strip())
    assert grant.txn == {"pi_1", "txn_2"}


def test_migrate_reports_an_up_to_date_schema(own_database: str) -> None:
    # Its own database: migrate records the (empty) effects its environment names as what
    # every process on that database must run, which the shared one's servers do not.
    first = paystream("migrate", env=clean_env(DATABASE_URL=own_database))
    assert first.returncode == 0, first.stderr
    assert "applied" in first.stdout
    result = paystream("migrate", env=clean_env(DATABASE_URL=own_database))
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout


async def test_trigger_signs_and_posts_like_stripe(ps: Paystream) -> None:
    pi = trigger.stripe_id("pi_")
    env = clean_env(STRIPE_WEBHOOK_SECRET=ps.server.webhook_secret)
    url = f"{ps.server.base_url}/v1/stripe/webhook"
    result = await asyncio.to_thread(paystream, "trigger", "payment_intent.requires_action", "--id", pi,
                                     "--amount", "15000", "--url", url, env=env)
    assert result.returncode == 0, result.stderr
    assert " -> 200 " in result.stdout
    txn = (await ps.get(pi)).json()
    assert (txn["status"], txn["amount"]) == ("requires_action", 15000)
    bad = await asyncio.to_thread(paystream, "trigger", "customer.created", "--id", pi, "--url", url, env=env)
    assert bad.returncode == 2 and "cannot build" in bad.stderr


async def test_sigterm_ends_streams_and_exits_cleanly(database_url: str) -> None:
    server = await asyncio.to_thread(Server(database_url).start)
    try:
        async with Paystream(server) as ps:
            pi = trigger.stripe_id("pi_")
            await ps.deliver(ps.event("payment_intent.processing", pi))
            async with ps.sse(pi) as stream:
                await stream.event()
                server.proc.send_signal(signal.SIGTERM)
                assert await stream.rest(timeout=15) == []  # the stream ends; the client reconnects
            code = await asyncio.to_thread(server.proc.wait, 20)
        # uvicorn re-raises the captured SIGTERM once its shutdown is complete; paystream
        # turns it into a normal exit with the shell's code for it (atexit clean-up runs)
        assert code == 128 + signal.SIGTERM, server.log_tail()
        assert "Application shutdown complete" in server.log_tail()
    finally:
        server.stop()


def test_dev_stops_its_postgres_and_localstripe_on_sigterm() -> None:
    """A process manager stops `paystream dev` with SIGTERM to it alone, not to its
    process group: the embedded Postgres and localstripe it started stop with it."""
    import psutil

    data_dir = tempfile.mkdtemp(prefix="ps-dev-")  # short: Postgres' socket path is limited
    env = {k: v for k, v in clean_env(PAYSTREAM_DATA_DIR=data_dir).items() if k != "STRIPE_API_BASE"}
    port = harness.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "paystream", "dev", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        harness.wait_until_up(proc, f"http://127.0.0.1:{port}/readyz", 60, lambda: f"data in {data_dir}")
        localstripe = [p for p in psutil.Process(proc.pid).children(recursive=True)
                       if "localstripe" in " ".join(p.cmdline())]
        postgres = [p for p in psutil.process_iter(["cmdline"])
                    if data_dir in " ".join(p.info["cmdline"] or []) and p.pid != proc.pid]
        assert len(localstripe) == 1 and postgres, "dev started localstripe and an embedded Postgres"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM  # the shell's code for "ended by SIGTERM"
        # Polled: the embedded Postgres' watchdog (db.start_embedded) ends just after dev does.
        def running() -> list[psutil.Process]:
            return [p for p in localstripe + postgres if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        deadline = time.monotonic() + 15
        while (alive := running()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alive == [], f"left running: {[' '.join(p.cmdline()) for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(data_dir, ignore_errors=True)
