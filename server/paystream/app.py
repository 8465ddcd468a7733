"""The ASGI app: routes and lifespan, nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Route, WebSocketRoute

from paystream import db, effects
from paystream.auth import deadlines, token_api
from paystream.auth.limits import HeaderLimit, StreamLimits
from paystream.auth.origins import AllowedOrigins, OriginPolicy
from paystream.changes import store
from paystream.config import Settings
from paystream.effects.card_validation import OUTBOX_CHANNEL
from paystream.effects.outbound import OUTBOUND_CHANNEL
from paystream.errors import ApiError, api_error_handler, http_error_handler, server_error_handler
from paystream.ingest import webhooks
from paystream.ingest.backfill import Backfiller
from paystream.ops import health, metrics, openapi
from paystream.ops.gc_tuning import GcTuning
from paystream.ops.logs import setup_logging
from paystream.ops.retention import Maintainer, Retention
from paystream.outbound.delivery import Deliverer
from paystream.payments import create, operations, payment_methods, refresh, refunds, subscriptions
from paystream.payments.reconcile_report import Reconciler
from paystream.payments.recovery import Recovery
from paystream.payments.refresh import RefreshLimits
from paystream.payments.stripe_api import StripeApi
from paystream.push import longpoll, sse, ws
from paystream.push.hub import Hub
from paystream.push.listener import LISTEN_MARK, nats_mark, warn_of_other_engines
from paystream.push.listener_nats import NatsListener
from paystream.push.listener_pg import PgListener

log = logging.getLogger("paystream.app")


def create_app(settings: Settings | None = None, extra_routes: list[BaseRoute] | None = None) -> Starlette:
    settings = settings or Settings()
    setup_logging()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        dsn = settings.database_url
        if not dsn:
            raise RuntimeError("DATABASE_URL is not set (use `paystream dev` for the embedded default)")
        metrics.watch_gc()
        metrics_port = metrics.serve_separately(settings)  # PAYSTREAM_METRICS_PORT, if set
        store.notify_events = settings.notify_events
        store.broker = settings.broker is not None
        active = effects.install(effects.Effects(effects.load(settings.effects)))
        nats_listener: list[NatsListener] = []  # set below; the pool's release hook wakes it
        # The engine's mark: a NATS node's pool carries it, a LISTEN node's listener does.
        engine_mark = nats_mark(settings.broker_name) if settings.broker else LISTEN_MARK
        pool = await db.create_pool(dsn, settings.db_pool_size,
                                    # unset: create_pool finds out (a pooler nobody declared)
                                    transaction_pooled=settings.db_pooler == "transaction" or None,
                                    on_release=(lambda: nats_listener and nats_listener[0].on_release())
                                    if settings.broker else None,
                                    application_name=engine_mark if settings.broker else "paystream")
        app.state.pool = pool
        app.state.schema_components = active.migrations()
        await health.check_schema(app)  # not ready (one log line) while migrations are missing
        if not app.state.schema_missing:
            async with pool.acquire(timeout=db.ACQUIRE_TIMEOUT) as conn:
                # What this database expects every process to run (`paystream migrate`
                # recorded it); `paystream serve` has refused to start on a mismatch.
                active = effects.install(await effects.for_database(conn, settings.effects, settings.outbound_url))
                await active.check(conn)
        log.info("effects: %s", ", ".join(active.names) or "none")
        # LISTEN needs a session of its own: PAYSTREAM_LISTEN_URL when DATABASE_URL is a
        # transaction pooler.  With PAYSTREAM_BROKER, NATS JetStream instead of LISTEN.
        listen_dsn = settings.listen_url or dsn
        listener: PgListener | NatsListener
        if settings.broker:
            listener = NatsListener([u.strip() for u in settings.broker.split(",")], settings.broker_name, pool)
            nats_listener.append(listener)
        else:
            listener = PgListener(listen_dsn, probe_dsn=dsn)
        hub = Hub(pool, listener, queue_limit=settings.subscriber_queue_limit,
                  queue_bytes=settings.subscriber_buffer_bytes)
        api = StripeApi.from_settings(settings) if settings.stripe_api_key else None
        recovery = backfiller = reconciler = None
        app.state.refresh_limits = RefreshLimits(settings.refresh_rate)
        if api is not None:
            recovery = Recovery(pool, api, stuck_after=timedelta(seconds=settings.stuck_after_seconds),
                                interval=settings.recovery_interval_seconds,
                                parked_expiry=timedelta(seconds=settings.parked_expiry_seconds))
            listener.on_channel(OUTBOX_CHANNEL, recovery.kick)
            recovery.start()
            # Events Stripe never delivered, from its event log: at start-up, then periodically.
            backfiller = Backfiller(pool, api, settings.backfill_interval_seconds)
            backfiller.start()
            if settings.reconcile_interval_seconds > 0:
                # Paced at a quarter of the Stripe budget: customers' calls come first.
                reconciler = Reconciler(pool, api, settings.reconcile_interval_seconds,
                                        pace=4 / settings.stripe_rate)
                reconciler.start()
        # Storage retention: partitions made before the first webhook, then a pass each
        # PAYSTREAM_PRUNE_INTERVAL (one process at a time).
        # (With the schema behind, each pass fails with a warning until `paystream migrate`.)
        maintainer = Maintainer(pool, Retention.from_settings(settings))
        if not app.state.schema_missing:
            await maintainer.start_up()
        maintainer.start()
        # Signed webhooks to the merchant's backend (PAYSTREAM_OUTBOUND_URL), from every process.
        outbound = Deliverer.from_settings(pool, dsn, settings)
        if outbound is not None:
            listener.on_channel(OUTBOUND_CHANNEL, outbound.kick)
            await outbound.start()
        await hub.start()
        app.state.hub, app.state.stripe = hub, api
        if not await hub.wait_ready(5):
            log.warning("the listener is not connected yet; /readyz answers 503 until it is")
        try:
            await warn_of_other_engines(pool, engine_mark)
        except db.DATABASE_ERRORS as exc:
            log.warning("could not look for nodes on another fan-out engine: %s", exc)
        drain = asyncio.create_task(sse.end_streams_on_shutdown(hub, settings.drain_seconds), name="paystream-drain")
        gc_tuning = GcTuning()
        gc_tuning.start()
        log.info("browser origins allowed: %s", AllowedOrigins(settings.allowed_origins).describe())
        ready = asyncio.create_task(health.announce_ready(
            app, db.redact(dsn) if settings.broker or listen_dsn == dsn
            else f"{db.redact(dsn)} (listening on {db.redact(listen_dsn)})"), name="paystream-ready")
        try:
            yield
        finally:
            ready.cancel()
            drain.cancel()
            if metrics_port is not None:
                metrics_port.close()
            await gc_tuning.stop()
            if recovery is not None:
                await recovery.stop()
            if backfiller is not None:
                await backfiller.stop()
            if reconciler is not None:
                await reconciler.stop()
            if outbound is not None:
                await outbound.stop()
            await maintainer.stop()
            await hub.stop()
            await pool.close()

    routes = [
        Route("/v1/stripe/webhook", webhooks.handle, methods=["POST"], name="stripe_webhook"),
        Route("/v1/transactions", create.create_transaction, methods=["POST"]),
        Route("/v1/customers/{id}/payment-methods", payment_methods.list_payment_methods, methods=["GET"]),
        Route("/v1/transactions/{id}", longpoll.get_transaction, methods=["GET"]),
        Route("/v1/transactions/{id}/events", sse.sse, methods=["GET"]),
        Route("/v1/transactions/{id}/refresh", refresh.refresh, methods=["POST"]),
        Route("/v1/transactions/{id}/capture", operations.capture, methods=["POST"]),
        Route("/v1/transactions/{id}/refunds", refunds.create_refund, methods=["POST"]),
        Route("/v1/transactions/{id}/cancel", subscriptions.cancel, methods=["POST"]),  # other kinds: operations.cancel
        WebSocketRoute("/v1/ws", ws.WebSocketEndpoint()),
        Route("/v1/stream-tokens", token_api.create_stream_token, methods=["POST"]),
        Route("/healthz", health.healthz),
        Route("/readyz", health.readyz),
        Route("/metrics", metrics.endpoint),
        Route("/openapi.json", openapi.endpoint),
    ]
    app = Starlette(
        routes=routes + (extra_routes or []),
        lifespan=lifespan,
        middleware=[Middleware(HeaderLimit, max_bytes=settings.max_header_bytes),
                    Middleware(OriginPolicy, allowed=AllowedOrigins(settings.allowed_origins))],
        exception_handlers={
            ApiError: api_error_handler,
            HTTPException: http_error_handler,
            ClientDisconnect: deadlines.client_gone_handler,
            Exception: server_error_handler,
        },
    )
    # Starlette answers a path with a trailing slash by a 307 to the path without it, its
    # Location built from the Host header with the query (a stream token) carried along:
    # a token handed to whoever the Host header names.  No path redirects: such a path is
    # unknown, 404 like any other (issue 22).
    app.router.redirect_slashes = False
    app.state.settings = settings
    app.state.limits = StreamLimits(settings.max_streams_per_token, settings.max_streams_per_address)
    return app
