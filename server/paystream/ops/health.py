"""Liveness and readiness: GET /healthz and GET /readyz."""

from __future__ import annotations

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


async def readyz(request: Request) -> JSONResponse:
    app = request.app
    checks = {"database": False, "listener": app.state.hub.ready, "schema": not app.state.schema_missing}
    with contextlib.suppress(Exception):
        # db.within, not asyncio.timeout: a partitioned database must get its 503 in 2 s,
        # not once asyncpg has finished unwinding the cancelled query.
        checks["database"], checks["schema"] = await db.within(2, _database_checks(app, checks["schema"]))
    ok = all(checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks},
                        status_code=200 if ok else 503)
