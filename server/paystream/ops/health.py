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


async def readyz(request: Request) -> JSONResponse:
    app = request.app
    checks = {"database": False, "listener": app.state.hub.ready, "schema": not app.state.schema_missing}
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2):
            checks["database"] = await app.state.pool.fetchval("SELECT true")
            if not checks["schema"]:
                checks["schema"] = not await check_schema(app)  # `paystream migrate` may have run since
    ok = all(checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks},
                        status_code=200 if ok else 503)
