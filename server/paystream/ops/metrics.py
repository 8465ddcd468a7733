"""Prometheus metrics, served at /metrics."""

from __future__ import annotations

import gc
import time

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response

WEBHOOKS = Counter("paystream_webhooks_total", "Verified Stripe webhooks by outcome", ["outcome"])
MISMATCHED = Counter("paystream_events_mismatched_total",
                     "Stripe events naming one of our transactions in metadata that do not match it "
                     "(another object already linked, or amount, currency or customer differ): kept, not applied")
CONNECTIONS = Gauge("paystream_connections", "Open streaming connections", ["transport"])
PUSHED = Counter("paystream_events_pushed_total", "Events handed to subscribers")
QUEUE_DROPS = Counter("paystream_subscriber_overflows_total",
                      "Subscribers cut off because they stopped reading")
LISTENER_RECONNECTS = Counter("paystream_listener_reconnects_total",
                              "Times the LISTEN connection was re-established")
LISTENER_UP = Gauge("paystream_listener_up", "1 while the LISTEN connection is healthy")
WEBHOOK_TO_PUSH = Histogram(
    "paystream_webhook_to_push_seconds",
    "From a change's write in the webhook transaction (its updated_at) to its hand-off to local subscribers",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
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
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
