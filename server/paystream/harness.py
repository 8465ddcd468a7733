"""A real paystream for tests and benchmarks: a fresh database and `paystream serve` as a
subprocess, talked to over HTTP exactly as Stripe and browsers do."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

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
    """A new, migrated database on the system Postgres or a new embedded one."""

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

        asyncio.run(migrate(self.url))

    def drop(self) -> None:
        asyncio.run(_admin(self.admin_url, f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)"))


def wait_until_up(proc: subprocess.Popen[bytes], url: str, timeout: float,
                  log_tail: Callable[[], str], ready: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200,
                  ) -> None:
    """Poll another process's start-up (there is nothing to await across processes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}: {log_tail()}")
        try:
            if ready(httpx.get(url, timeout=1)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{proc.args[:3]} not ready in {timeout}s: {log_tail()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`paystream serve` as a subprocess, as an operator would run it."""

    def __init__(self, database_url: str, extra_env: dict[str, str] | None = None,
                 log_dir: Path | None = None, args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = "psk_test_" + secrets.token_hex(8)
        self.webhook_secret = "whsec_" + secrets.token_hex(12)
        self.rotated_secret = "whsec_" + secrets.token_hex(12)  # the second of two, as in a rotation
        self.token_secret = secrets.token_hex(32)
        self.database_url = database_url
        self.args = args
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "STRIPE_WEBHOOK_SECRET": f"{self.webhook_secret}, {self.rotated_secret}",
            "STRIPE_API_KEY": "sk_test_paystream",
            "PAYSTREAM_API_KEY": self.api_key,
            "PAYSTREAM_TOKEN_SECRET": self.token_secret,
            "PORT": str(self.port),
            **(extra_env or {}),
        }
        log_dir = log_dir or Path(tempfile.gettempdir())
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> Server:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "paystream", "serve", *self.args], env=self.env, stdout=log, stderr=log
        )
        wait_until_up(self.proc, f"{self.base_url}/readyz", timeout, self.log_tail)
        return self

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
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except OSError:
            return ""
