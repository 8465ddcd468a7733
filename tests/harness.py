"""A real paystream for tests and benchmarks (bench/ imports it too): a fresh database and `paystream serve` as a
subprocess, talked to over HTTP exactly as Stripe and browsers do."""

from __future__ import annotations

import asyncio
import os
import resource
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from paystream.dev.processes import free_port, wait_until_up

ROOT = Path(__file__).resolve().parents[1]
# The seeds' rules, as merchant effects (examples/): the whole-system tests enable them.
EXAMPLE_EFFECTS = "examples.contract_revisions:effect,sql:public.ad_sales_on_status"
EXAMPLE_MIGRATIONS = {"contract_revisions": ROOT / "examples" / "contract_revisions" / "migrations",
                      "ad_sales": ROOT / "examples" / "ad_sales" / "migrations"}
EXAMPLES_ENV = {"PAYSTREAM_EFFECTS": EXAMPLE_EFFECTS,
                "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}

SYSTEM_PG = os.environ.get("PAYSTREAM_TEST_SYSTEM_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def system_reachable() -> bool:
    try:
        asyncio.run(_admin(SYSTEM_PG, "SELECT 1"))
        return True
    except (OSError, asyncpg.PostgresError):
        return False


class FreshDatabase:
    """A new database on the system Postgres or a new embedded one, migrated with
    paystream's schema and the examples' (whether or not a server enables them)."""

    def __init__(self, backend: str) -> None:
        if backend == "system":
            self.admin_url = SYSTEM_PG
        elif backend == "embedded":
            from paystream.db import start_embedded

            self.admin_url = start_embedded(tempfile.mkdtemp(prefix="paystream-pg-"))
        else:
            raise ValueError(f"unknown Postgres backend {backend!r} (system or embedded)")
        self.backend = backend
        self.name = f"paystream_test_{secrets.token_hex(4)}"
        asyncio.run(_admin(self.admin_url, f"CREATE DATABASE {self.name}"))
        self.url = urlunsplit(urlsplit(self.admin_url)._replace(path=f"/{self.name}"))
        from paystream.db import migrate

        asyncio.run(migrate(self.url, EXAMPLE_MIGRATIONS))

    def drop(self) -> None:
        asyncio.run(_admin(self.admin_url, f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)"))


class Server:
    """`paystream serve` as a subprocess, as an operator would run it."""

    def __init__(self, database_url: str, extra_env: dict[str, str] | None = None,
                 log_dir: Path | None = None, args: tuple[str, ...] = (),
                 file_limit: int | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = "psk_test_" + secrets.token_hex(8)
        self.webhook_secret = "whsec_" + secrets.token_hex(12)
        self.rotated_secret = "whsec_" + secrets.token_hex(12)  # the second of two, as in a rotation
        self.token_secret = secrets.token_hex(32)
        self.database_url = database_url
        self.args = args
        self.file_limit = file_limit  # RLIMIT_NOFILE for the server process (default: this one's)
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "STRIPE_WEBHOOK_SECRET": f"{self.webhook_secret}, {self.rotated_secret}",
            "STRIPE_API_KEY": "sk_test_paystream",
            "PAYSTREAM_API_KEY": self.api_key,
            "PAYSTREAM_TOKEN_SECRET": self.token_secret,
            "PORT": str(self.port),
            # Stripe is never reached: a test that needs Stripe names its emulator; any other
            # call is refused at once (the discard port) instead of going to api.stripe.com.
            "STRIPE_API_BASE": "http://127.0.0.1:9",
            **(extra_env or {}),
        }
        log_dir = log_dir or Path(tempfile.gettempdir())
        log_dir.mkdir(parents=True, exist_ok=True)
        # Its own file: a port is reused across runs, and a log appended to an earlier
        # run's would hold lines this server never wrote (its restarts append to it).
        self.log_path = log_dir / f"server-{self.port}-{secrets.token_hex(4)}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30, ready: Callable[[httpx.Response], bool] | None = None) -> Server:
        """Start and wait for /readyz to answer 200 (or to satisfy `ready`)."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "paystream", "serve", *self.args], env=self.env, stdout=log, stderr=log,
            preexec_fn=None if self.file_limit is None else self._limit_files,
        )
        wait_until_up(self.proc, f"{self.base_url}/readyz", timeout, self.log_tail,
                      *([ready] if ready is not None else []))
        return self

    def _limit_files(self) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.file_limit, self.file_limit))

    def stop(self, sig: int = 15, timeout: float = 20) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log_tail(self, n: int = 40) -> str:
        return tail(self.log_path, n)


def tail(path: Path, n: int = 40) -> str:
    """The last `n` lines of another process's log ("" if there is none yet)."""
    try:
        return "\n".join(path.read_text().splitlines()[-n:])
    except OSError:
        return ""


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds, and reap it."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
