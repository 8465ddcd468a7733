"""Prometheus metrics, served at /metrics."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response

WEBHOOKS = Counter("paystream_webhooks_total", "Verified Stripe webhooks by outcome", ["outcome"])
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


async def endpoint(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
