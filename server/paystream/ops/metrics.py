"""Prometheus metrics, served at /metrics on the public port, or with PAYSTREAM_METRICS_PORT on their own."""

from __future__ import annotations

import gc
import logging
import os
import time
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from starlette.requests import Request
from starlette.responses import Response

from paystream.errors import error_response

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from paystream.config import Settings

log = logging.getLogger("paystream.metrics")

WEBHOOKS = Counter("paystream_webhooks_total", "Verified Stripe webhooks by outcome", ["outcome"])
WEBHOOK_CONFLICTS = Counter("paystream_webhook_conflicts_total",
                            "Webhooks whose database transaction Postgres rolled back to break a deadlock "
                            "(or a serialization conflict) with other work, and that were applied again at once")
MISMATCHED = Counter("paystream_events_mismatched_total",
                     "Stripe events naming one of our transactions in metadata that do not match it "
                     "(another object already linked, or amount, currency or customer differ): kept, not applied")
STRIPE_BREAKER = Gauge("paystream_stripe_breaker_state",
                       "The circuit breaker in front of Stripe: 0 closed, 1 half-open (one probe call), "
                       "2 open (calls fail at once with 503 stripe_unavailable)")
STRIPE_BREAKER_CHANGES = Counter("paystream_stripe_breaker_changes_total",
                                 "Moves of the Stripe circuit breaker, by the state moved to", ["state"])
STRIPE_RATE_LIMITED = Counter("paystream_stripe_rate_limited_total",
                              "429 answers from Stripe (calls paused for the time it asked)")
IGNORED = Counter("paystream_events_ignored_total",
                  "Authentic Stripe events of a type paystream does not use: answered 200, stored with "
                  "outcome ignored", ["type"])
INVALID = Counter("paystream_events_invalid_total",
                  "Authentic Stripe events that contradict their transaction (a refund or dispute of more "
                  "than was paid): kept with outcome invalid, not applied")
# Storage retention (ops/retention.py).
PRUNE_RUNS = Counter("paystream_prune_runs_total", "Retention passes that ran (held the lock)")
PRUNED_ROWS = Counter("paystream_pruned_rows_total", "Rows removed by retention, by table", ["table"])
PARTITIONS_DROPPED = Counter("paystream_partitions_dropped_total",
                             "Partitions of processed Stripe events dropped past PAYSTREAM_RETAIN_STRIPE_EVENTS")
PARTITIONS_KEPT = Gauge("paystream_partitions_kept",
                        "Partitions past retention kept because they still hold events not processed "
                        "(failed, parked): `paystream events` lists them")
PARKED_EXPIRED = Counter("paystream_parked_events_expired_total",
                         "Stripe events parked for a transaction that was never written, expired after "
                         "PAYSTREAM_PARKED_EXPIRY (outcome expired)")
# Transactions and Stripe disagreeing (payments/recovery.py, payments/reconcile_report.py).
TRANSACTIONS_STUCK = Gauge("paystream_transactions_stuck",
                           "Transactions linked to Stripe, not settled (before succeeded or canceled), that have "
                           "not moved for PAYSTREAM_STUCK_AFTER, by status (database-wide, set by each recovery pass)",
                           ["status"])
RECONCILE_DIFFERENCES = Counter("paystream_reconcile_differences_total",
                                "Differences between a transaction and its Stripe object found by the periodic "
                                "reconcile report (PAYSTREAM_RECONCILE_INTERVAL), by field", ["field"])
RECONCILE_RUNS = Counter("paystream_reconcile_runs_total",
                         "Periodic reconcile reports this process ran, by result: clean, differences, incomplete "
                         "(some transactions could not be read from Stripe)", ["result"])
RECONCILE_LAST_RUN = Gauge("paystream_reconcile_last_run_timestamp_seconds",
                           "When this process last finished a periodic reconcile report (Unix time; 0: not yet)")
CONNECTIONS = Gauge("paystream_connections", "Open streaming connections", ["transport"])
PUSHED = Counter("paystream_events_pushed_total", "Events handed to subscribers")
PUSHED_FROM_NOTIFY = Counter("paystream_notifications_pushed_total",
                             "Notifications whose event was pushed straight from the notification (no log read)")
LOG_READS = Counter("paystream_log_reads_total",
                    "Reads of the event log to push: a gap, a pointer-only notification, a resume or a catch-up")
QUEUE_DROPS = Counter("paystream_subscriber_overflows_total",
                      "Subscribers cut off because they stopped reading")
LISTENER_RECONNECTS = Counter("paystream_listener_reconnects_total",
                              "Times the LISTEN connection was re-established")
LISTENER_UP = Gauge("paystream_listener_up", "1 while the LISTEN (or NATS) connection is healthy")
BROKER_PUBLISHED = Counter("paystream_broker_published_total",
                           "Logged events this process published to NATS JetStream (PAYSTREAM_BROKER)")
WEBHOOK_TO_PUSH = Histogram(
    "paystream_webhook_to_push_seconds",
    "From a change's write in the webhook transaction (its updated_at) to its hand-off to local subscribers",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)

# Signed webhooks to the merchant's backend (outbound/delivery.py).  The gauges count the
# whole database's queue (every process reports the same numbers, refreshed every 5 s);
# the counter and the histogram count this process's attempts.
OUTBOUND_PENDING = Gauge("paystream_outbound_pending",
                         "Outbound webhook messages not yet delivered nor given up (database-wide)")
OUTBOUND_FAILED = Gauge("paystream_outbound_failed",
                        "Outbound webhook messages whose retry schedule ran out, until replayed (database-wide)")
OUTBOUND_OLDEST = Gauge("paystream_outbound_oldest_pending_seconds",
                        "Age of the oldest pending outbound webhook message (0 when none)")
OUTBOUND_ATTEMPTS = Counter("paystream_outbound_attempts_total",
                            "Outbound webhook attempts by result: delivered (2xx), retry, failed (schedule over)",
                            ["result"])
OUTBOUND_LATENCY = Histogram(
    "paystream_outbound_delivery_seconds",
    "From an event's logging (or replay) to its 2xx from the merchant's backend, retries included",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
             3600.0, 21600.0, 86400.0),
)


GC_PAUSE = Histogram(
    "paystream_gc_pause_seconds",
    "Garbage-collection pauses by generation: a full (2) collection walks every live object, "
    "so it grows with the number of open streams",
    ["generation"],
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
_gc_started = 0.0


def _time_gc(phase: str, info: dict[str, int]) -> None:
    global _gc_started  # noqa: PLW0603  # one collector per process, one collection at a time
    if phase == "start":
        _gc_started = time.perf_counter()
    else:
        GC_PAUSE.labels(str(info["generation"])).observe(time.perf_counter() - _gc_started)


def watch_gc() -> None:
    """Time every collection (the callback costs ~1 µs; collections are what stall streams)."""
    if _time_gc not in gc.callbacks:
        gc.callbacks.append(_time_gc)


async def endpoint(request: Request) -> Response:
    if request.app.state.settings.metrics_port is not None:
        # Served on the operator's port instead: the public port does not show the
        # process's file descriptors, memory and versions to anyone who asks.
        return error_response(404, "not_found", "not found")
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


class MetricsPort:
    """/metrics on its own listener (PAYSTREAM_METRICS_PORT, on PAYSTREAM_METRICS_HOST):
    prometheus_client's HTTP server in a daemon thread of this process.

    Only one process can bind a port, and each `serve --workers N` process has its own
    counters, so each worker binds the first free port of PORT … PORT+N-1 (N from
    WEB_CONCURRENCY, which `serve` sets): scrape all N.  With one worker it is PORT."""

    def __init__(self, host: str, port: int, workers: int) -> None:
        self.server: WSGIServer | None = None
        self.port: int | None = None
        for candidate in range(port, port + max(1, workers)):
            try:
                self.server, _thread = start_http_server(candidate, addr=host)
            except OSError:
                continue
            self.port = candidate
            log.info("metrics on http://%s:%d/metrics", host, candidate)
            return
        log.error("metrics: no free port in %d-%d on %s; this worker serves no metrics",
                  port, port + max(1, workers) - 1, host)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def serve_separately(settings: Settings) -> MetricsPort | None:
    """Start the operator's metrics listener if PAYSTREAM_METRICS_PORT is set."""
    if settings.metrics_port is None:
        return None
    try:
        workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
    except ValueError:
        workers = 1
    return MetricsPort(settings.metrics_host, settings.metrics_port, workers)
