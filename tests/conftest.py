"""Real Postgres for every test: the system server and the embedded one, a fresh database
per run on each; and a real `paystream serve` subprocess for whole-system tests."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from tests.support import Paystream

SYSTEM_PG = os.environ.get("PAYSTREAM_TEST_SYSTEM_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
BACKENDS = [b.strip() for b in os.environ.get("PAYSTREAM_TEST_PG", "system,embedded").split(",") if b.strip()]
ARTIFACTS = Path(__file__).parent / "artifacts"


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _system_reachable() -> bool:
    try:
        asyncio.run(_admin(SYSTEM_PG, "SELECT 1"))
        return True
    except (OSError, asyncpg.PostgresError):
        return False


@pytest.fixture(scope="session", params=BACKENDS)
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, migrated database for this run on the system or the embedded Postgres."""
    backend = request.param
    if backend == "system":
        if not _system_reachable():
            if os.environ.get("PAYSTREAM_REQUIRE_SYSTEM_PG"):
                pytest.fail(f"system Postgres at {SYSTEM_PG} is required but unreachable")
            pytest.skip(f"no system Postgres at {SYSTEM_PG}")
        admin = SYSTEM_PG
    elif backend == "embedded":
        from paystream.db import start_embedded

        admin = start_embedded(tempfile.mkdtemp(prefix="paystream-test-pg-"))
    else:
        raise ValueError(f"unknown PAYSTREAM_TEST_PG backend {backend!r}")
    name = f"paystream_test_{secrets.token_hex(4)}"
    asyncio.run(_admin(admin, f"CREATE DATABASE {name}"))
    url = _with_database(admin, name)
    from paystream.db import migrate

    asyncio.run(migrate(url))
    yield url
    asyncio.run(_admin(admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`paystream serve` as a subprocess, as an operator would run it."""

    def __init__(self, database_url: str, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = "psk_test_" + secrets.token_hex(8)
        self.webhook_secret = "whsec_" + secrets.token_hex(12)
        self.rotated_secret = "whsec_" + secrets.token_hex(12)  # the second of two, as in a rotation
        self.token_secret = secrets.token_hex(32)
        self.database_url = database_url
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "STRIPE_WEBHOOK_SECRET": f"{self.webhook_secret}, {self.rotated_secret}",
            "PAYSTREAM_API_KEY": self.api_key,
            "PAYSTREAM_TOKEN_SECRET": self.token_secret,
            "PORT": str(self.port),
            **(extra_env or {}),
        }
        ARTIFACTS.mkdir(exist_ok=True)
        self.log_path = ARTIFACTS / f"server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> Server:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "paystream", "serve"], env=self.env, stdout=log, stderr=log
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)  # start-up poll of a separate process, not a test synchronisation
        raise RuntimeError(f"server not ready in {timeout}s: {self.log_tail()}")

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


@pytest.fixture(scope="session")
def server(database_url: str) -> Iterator[Server]:
    srv = Server(database_url, {"PAYSTREAM_SSE_PING": "1"}).start()
    yield srv
    srv.stop()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    from paystream.store import init_connection

    conn = await asyncpg.connect(database_url)
    await init_connection(conn)
    yield conn
    await conn.close()


@pytest.fixture
async def ps(server: Server) -> AsyncIterator[Paystream]:
    async with Paystream(server) as client:
        yield client
