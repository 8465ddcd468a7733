"""Real Postgres for every test: the system server and the embedded one, a fresh database
per run on each; and a real `paystream serve` subprocess for whole-system tests."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from paystream.dev.localstripe import LocalStripe
from tests import harness, stripe_emulator
from tests.harness import SYSTEM_PG, FreshDatabase, system_reachable
from tests.support import Paystream

BACKENDS = [b.strip() for b in os.environ.get("PAYSTREAM_TEST_PG", "system,embedded").split(",") if b.strip()]
ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="session", params=BACKENDS)
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, migrated database for this run on the system or the embedded Postgres."""
    if request.param == "system" and not system_reachable():
        if os.environ.get("PAYSTREAM_REQUIRE_SYSTEM_PG"):
            pytest.fail(f"system Postgres at {SYSTEM_PG} is required but unreachable")
        pytest.skip(f"no system Postgres at {SYSTEM_PG}")
    database = FreshDatabase(request.param)
    yield database.url
    database.drop()


class Server(harness.Server):
    def __init__(self, database_url: str, extra_env: dict[str, str] | None = None) -> None:
        super().__init__(database_url, extra_env, log_dir=ARTIFACTS)


@pytest.fixture(scope="session")
def local_stripe() -> Iterator[LocalStripe]:
    stripe = LocalStripe(harness.free_port(), ARTIFACTS, module=stripe_emulator.MODULE, cwd=harness.ROOT).start()
    yield stripe
    stripe.stop()


@pytest.fixture(scope="session")
def server(database_url: str, local_stripe: LocalStripe) -> Iterator[Server]:
    # No periodic backfill during a run: tests that leave an event undelivered on purpose
    # must not see it applied behind their back (test_backfill.py runs its own).
    srv = Server(database_url, {"PAYSTREAM_SSE_PING": "1", "STRIPE_API_BASE": local_stripe.url,
                                "PAYSTREAM_BACKFILL_INTERVAL": "86400", **harness.EXAMPLES_ENV}).start()
    # localstripe posts every event to every registered URL: this run's server takes over.
    local_stripe.register_webhook(f"{srv.base_url}/v1/stripe/webhook", srv.webhook_secret)
    yield srv
    # After every test that used this database (the money tests among them): its ledger
    # balances and agrees with every transaction's status and amounts.
    check = subprocess.run([sys.executable, "-m", "paystream", "ledger", "--check"], cwd=harness.ROOT,
                           env={**srv.env}, capture_output=True, text=True, timeout=300)
    srv.stop()
    assert check.returncode == 0, ("`paystream ledger --check` on the suite's database:\n"
                                   + check.stdout[-4000:] + check.stderr[-2000:])


@pytest.fixture
async def own_database(database_url: str) -> AsyncIterator[str]:
    """An empty database of the test's own on the same Postgres, for a test that records
    what the whole database expects (`paystream migrate`) and must not impose it on the
    other tests' shared one."""
    name = f"paystream_own_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        yield urlunsplit(urlsplit(database_url)._replace(path=f"/{name}"))
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
def fresh_stripe() -> Iterator[LocalStripe]:
    """An emulator of the test's own, with no events: a server on a database of its own
    would otherwise backfill, at start-up, every event the session's emulator holds."""
    stripe = LocalStripe(harness.free_port(), ARTIFACTS, module=stripe_emulator.MODULE, cwd=harness.ROOT).start()
    yield stripe
    stripe.stop()


@pytest.fixture
async def isolated(own_database: str) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    """A migrated database of the test's own and a connection to it: for a test whose
    servers' background work (the outbox, the sweeper) must not meet the shared database's
    rows, made against other tests' emulators."""
    from paystream.changes.store import init_connection
    from paystream.db import migrate

    await migrate(own_database, harness.EXAMPLE_MIGRATIONS)
    conn = await asyncpg.connect(own_database)
    await init_connection(conn)
    yield own_database, conn
    await conn.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    from paystream.changes.store import init_connection

    conn = await asyncpg.connect(database_url)
    await init_connection(conn)
    yield conn
    await conn.close()


@pytest.fixture
async def ps(server: Server) -> AsyncIterator[Paystream]:
    async with Paystream(server) as client:
        yield client
