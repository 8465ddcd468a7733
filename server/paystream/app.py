"""The ASGI app: routes and lifespan, nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

from paystream import access, db, metrics, openapi, payments, streams, tokens, webhooks
from paystream.config import Settings
from paystream.errors import (
    ApiError,
    api_error_handler,
    http_error_handler,
    server_error_handler,
)
from paystream.gc_tuning import GcTuning
from paystream.hub import Hub
from paystream.limits import HeaderLimit, StreamLimits, read_limited
from paystream.logs import setup_logging
from paystream.recovery import OUTBOX_CHANNEL, Recovery
from paystream.stripe_api import StripeApi

log = logging.getLogger("paystream.app")

MAX_JSON_BODY = 64 * 1024


async def json_body(request: Request) -> dict:
    raw = await read_limited(request, MAX_JSON_BODY)
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise ApiError(400, "bad_request", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return body


class StreamTokenRequest(BaseModel):
    model_config = {"extra": "forbid"}
    transaction_ids: list[str] | None = Field(default=None, max_length=100)
    customer_id: str | None = Field(default=None, min_length=1, max_length=255, pattern=r"^[^\x00]+$")
    ttl_seconds: int = Field(default=3600, ge=1, le=86400)


async def create_stream_token(request: Request) -> JSONResponse:
    access.backend(request)
    try:
        req = StreamTokenRequest.model_validate(await json_body(request))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(400, "bad_request", f"{where}: {first['msg']}") from None
    if not req.transaction_ids and not req.customer_id:
        raise ApiError(400, "bad_request", "give transaction_ids or customer_id")
    token, exp = tokens.mint(request.app.state.settings.paystream_token_secret,
                             txn=req.transaction_ids, cus=req.customer_id, ttl_seconds=req.ttl_seconds)
    expires_at = datetime.fromtimestamp(exp, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return JSONResponse({"token": token, "expires_at": expires_at}, status_code=201)


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    checks = {"database": False, "listener": request.app.state.hub.ready}
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2):
            checks["database"] = await request.app.state.pool.fetchval("SELECT true")
    ok = all(checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks},
                        status_code=200 if ok else 503)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings()
    setup_logging()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        dsn = settings.database_url
        if not dsn:
            raise RuntimeError("DATABASE_URL is not set (use `paystream dev` for the embedded default)")
        metrics.watch_gc()
        await db.migrate(dsn)
        pool = await db.create_pool(dsn, settings.db_pool_size)
        hub = Hub(dsn, pool, queue_limit=settings.subscriber_queue_limit,
                  queue_bytes=settings.subscriber_buffer_bytes)
        api = StripeApi(settings.stripe_api_key, settings.stripe_api_base) if settings.stripe_api_key else None
        recovery = None
        if api is not None:
            recovery = Recovery(pool, api, stuck_after=timedelta(seconds=settings.stuck_after_seconds),
                                interval=settings.recovery_interval_seconds)
            hub.on_channel(OUTBOX_CHANNEL, recovery.kick)
            recovery.start()
        await hub.start()
        app.state.pool, app.state.hub, app.state.stripe = pool, hub, api
        await hub.wait_ready(5)
        drain = asyncio.create_task(streams.end_streams_on_shutdown(hub), name="paystream-drain")
        gc_tuning = GcTuning()
        gc_tuning.start()
        log.info("paystream ready on %s", db.redact(dsn))
        try:
            yield
        finally:
            drain.cancel()
            await gc_tuning.stop()
            if recovery is not None:
                await recovery.stop()
            await hub.stop()
            await pool.close()

    routes = [
        Route("/v1/stripe/webhook", webhooks.handle, methods=["POST"], name="stripe_webhook"),
        Route("/v1/transactions", payments.create_transaction, methods=["POST"]),
        Route("/v1/transactions/{id}", streams.get_transaction, methods=["GET"]),
        Route("/v1/transactions/{id}/events", streams.sse, methods=["GET"]),
        WebSocketRoute("/v1/ws", streams.WebSocketEndpoint()),
        Route("/v1/stream-tokens", create_stream_token, methods=["POST"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics.endpoint),
        Route("/openapi.json", openapi.endpoint),
    ]
    if settings.demo:
        from paystream import demo

        routes += demo.routes
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(HeaderLimit, max_bytes=settings.max_header_bytes)],
        exception_handlers={
            ApiError: api_error_handler,
            HTTPException: http_error_handler,
            Exception: server_error_handler,
        },
    )
    app.state.settings = settings
    app.state.limits = StreamLimits(settings.max_streams_per_token, settings.max_streams_per_address)
    return app
