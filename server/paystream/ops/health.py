"""Liveness and readiness: GET /healthz and GET /readyz."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse

from paystream import db

log = logging.getLogger("paystream.health")


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def check_schema(app: Starlette) -> list[str]:
    """Record (and log once per change) the migrations the database lacks."""
    missing = await db.missing_migrations(app.state.pool, app.state.schema_components)
    if missing and missing != getattr(app.state, "schema_missing", None):
        log.error("the database schema is behind this paystream: %s not applied; run `paystream migrate`",
                  ", ".join(missing))
    elif not missing and getattr(app.state, "schema_missing", None):
        log.info("the database schema is up to date now")
    app.state.schema_missing = missing
    return missing


async def _database_checks(app: Starlette, schema_ok: bool) -> tuple[bool, bool]:
    database_ok = await app.state.pool.fetchval("SELECT true")
    if not schema_ok:
        schema_ok = not await check_schema(app)  # `paystream migrate` may have run since
    return database_ok, schema_ok


async def readiness(app: Starlette) -> dict[str, bool]:
    """The checks /readyz answers with: all true means ready."""
    checks = {"database": False, "listener": app.state.hub.ready, "schema": not app.state.schema_missing}
    with contextlib.suppress(Exception):
        # db.within, not asyncio.timeout: a partitioned database must get its 503 in 2 s,
        # not once asyncpg has finished unwinding the cancelled query.
        checks["database"], checks["schema"] = await db.within(2, _database_checks(app, checks["schema"]))
    return checks


async def readyz(request: Request) -> JSONResponse:
    checks = await readiness(request.app)
    ok = all(checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks},
                        status_code=200 if ok else 503)


_WHY = {"database": "the database does not answer",
        "listener": "the change listener has not heard its own NOTIFY (see the listener's lines)",
        "schema": "migrations are missing (run `paystream migrate`)"}


async def announce_ready(app: Starlette, where: str, interval: float = 1.0) -> None:
    """Log "paystream ready on …" once /readyz would answer 200 (never before: an operator
    or a script waiting for that line must be able to trust it), and until then, each time
    the reasons change, why not."""
    said: list[str] = []
    while True:
        checks = await readiness(app)
        failing = [name for name, ok in checks.items() if not ok]
        if not failing:
            log.info("paystream ready on %s", where)
            return
        if failing != said:
            log.warning("paystream is not ready: %s; /readyz answers 503 until then",
                        "; ".join(_WHY[name] for name in failing))
            said = failing
        await asyncio.sleep(interval)
