"""Settings from the environment (names are part of the public contract)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Secrets `paystream serve` refuses to start without, by environment variable name.
REQUIRED_SECRETS = ("STRIPE_API_KEY", "STRIPE_WEBHOOK_SECRET", "PAYSTREAM_API_KEY", "PAYSTREAM_TOKEN_SECRET")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    database_url: str | None = None
    stripe_api_key: str | None = None
    stripe_api_base: str | None = None
    stripe_webhook_secret: str | None = None
    paystream_api_key: str | None = None
    paystream_token_secret: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000

    # Where the embedded Postgres keeps its data when DATABASE_URL is unset.
    paystream_data_dir: str = ".paystream"
    # Stripe's own default tolerance for a signature's timestamp.
    webhook_tolerance_seconds: int = Field(default=300, alias="PAYSTREAM_WEBHOOK_TOLERANCE")
    max_body_bytes: int = 1024 * 1024
    # Comment ping on idle SSE streams; the contract promises at least every 15 s.
    sse_ping_seconds: float = Field(default=15.0, alias="PAYSTREAM_SSE_PING")
    # Events a subscriber may have queued unread before it is cut off (it resumes by seq).
    subscriber_queue_limit: int = Field(default=1000, alias="PAYSTREAM_QUEUE_LIMIT")
    # Unread bytes a subscriber may queue before it is cut off (it resumes by seq).
    subscriber_buffer_bytes: int = Field(default=1 << 20, alias="PAYSTREAM_SUBSCRIBER_BUFFER")
    # Open streams (SSE, WebSocket, long-poll) one stream token, or one client address, may hold.
    max_streams_per_token: int = Field(default=20, alias="PAYSTREAM_MAX_STREAMS_PER_TOKEN")
    max_streams_per_address: int = Field(default=500, alias="PAYSTREAM_MAX_STREAMS_PER_ADDRESS")
    # Open connections (HTTP and WebSocket) one client address may hold, per process; one
    # more is answered 429 too_many_connections and closed (auth/connections.py). Above the
    # streams per address, so an address holding all its streams can still make requests.
    # A trusted proxy's own address is not capped.
    max_connections_per_address: int = Field(default=1000, ge=1, alias="PAYSTREAM_MAX_CONNECTIONS_PER_ADDRESS")
    max_header_bytes: int = Field(default=16 * 1024, alias="PAYSTREAM_MAX_HEADER_BYTES")
    long_poll_max_seconds: float = 60.0
    db_pool_size: int = Field(default=10, alias="PAYSTREAM_DB_POOL")
    # The sweeper re-reads a transaction not settled with no news for this long, and counts
    # those still unsettled past it (paystream_transactions_stuck).
    stuck_after_seconds: float = Field(default=900, alias="PAYSTREAM_STUCK_AFTER")
    recovery_interval_seconds: float = Field(default=60, alias="PAYSTREAM_RECOVERY_INTERVAL")
    # Seconds between reconcile reports (payments/reconcile_report.py: transactions touched
    # since the last one compared with Stripe, differences counted and logged), one process
    # at a time across the deployment; 0 runs none.
    reconcile_interval_seconds: float = Field(default=86400, ge=0, alias="PAYSTREAM_RECONCILE_INTERVAL")
    # Calls to Stripe (paystream.payments.breaker): the timeout of one attempt (stripe-python
    # makes up to three), the breaker's threshold of consecutive failures and how long it
    # stays open before a probe, and the per-process budget in calls a second (Stripe
    # documents 100 a second per endpoint in live mode).
    stripe_timeout_seconds: float = Field(default=10, gt=0, alias="PAYSTREAM_STRIPE_TIMEOUT")
    stripe_breaker_failures: int = Field(default=5, ge=1, alias="PAYSTREAM_STRIPE_BREAKER_FAILURES")
    stripe_breaker_seconds: float = Field(default=30, gt=0, alias="PAYSTREAM_STRIPE_BREAKER_SECONDS")
    stripe_rate: float = Field(default=80, gt=0, alias="PAYSTREAM_STRIPE_RATE")
    # How long an event naming a txn_ that is not written yet waits for it (parked) before
    # it expires (outcome `expired`).
    parked_expiry_seconds: float = Field(default=86400, gt=0, alias="PAYSTREAM_PARKED_EXPIRY")
    # Storage retention (issue 25; ops/retention.py), seconds; 0 keeps that kind forever.
    # Processed Stripe events' partitions are dropped once their whole range is older than
    # this (35 days: past Stripe's 30-day event window, so a backfill still recognises them);
    # delivered outbound webhooks and finished outbox jobs after 7 days; idempotency keys
    # after 24 hours (Stripe's own window).  The log, the ledger, refunds and transactions
    # are never pruned.  Each server runs a pass every PAYSTREAM_PRUNE_INTERVAL seconds (one
    # process at a time); partitions are PAYSTREAM_PARTITION_INTERVAL seconds of events.
    retain_stripe_events_seconds: float = Field(default=35 * 86400, ge=0, alias="PAYSTREAM_RETAIN_STRIPE_EVENTS")
    retain_delivered_seconds: float = Field(default=7 * 86400, ge=0, alias="PAYSTREAM_RETAIN_DELIVERED")
    retain_idempotency_keys_seconds: float = Field(default=86400, ge=0, alias="PAYSTREAM_RETAIN_IDEMPOTENCY_KEYS")
    partition_interval_seconds: float = Field(default=86400, ge=1, alias="PAYSTREAM_PARTITION_INTERVAL")
    prune_interval_seconds: float = Field(default=3600, gt=0, alias="PAYSTREAM_PRUNE_INTERVAL")
    # Merchant effects, comma-separated: module:attribute or sql:schema.function (see
    # paystream.effects); the built-ins and installed entry points run as well.
    effects: str | None = Field(default=None, alias="PAYSTREAM_EFFECTS")
    # POST /v1/transactions/{id}/refresh: Stripe reads per second, per process, in all
    # (each transaction is read at most once per REFRESH_EVERY seconds besides).
    refresh_rate: float = Field(default=20.0, gt=0, alias="PAYSTREAM_REFRESH_RATE")
    # Seconds between backfills from Stripe's event log (each process, one at a time).
    backfill_interval_seconds: float = Field(default=600, gt=0, alias="PAYSTREAM_BACKFILL_INTERVAL")
    # Notifications carry the pushed event when it fits (listeners then push without
    # reading the log); 0 sends ids only, as before (every listening node reads the log).
    notify_events: bool = Field(default=True, alias="PAYSTREAM_NOTIFY_EVENTS")
    # Browser origins that may use paystream (CORS, WebSocket Origin): exact origins,
    # comma-separated; `*` only when written; `http://localhost:*` for any port.
    allowed_origins: str | None = Field(default=None, alias="PAYSTREAM_ALLOWED_ORIGINS")
    # The longest a stream token may live: longer ttl_seconds are refused (400), and a
    # token whose exp is further ahead (minted elsewhere) is refused (401).
    max_token_ttl: int = Field(default=3600, ge=1, alias="PAYSTREAM_MAX_TOKEN_TTL")
    # The LISTEN connection's URL (default: DATABASE_URL). With DATABASE_URL on a
    # transaction-mode pooler (PgBouncer), point this straight at Postgres: LISTEN needs a
    # session of its own. The migration lock takes it too.
    listen_url: str | None = Field(default=None, alias="PAYSTREAM_LISTEN_URL")
    # `transaction`: DATABASE_URL is a transaction-mode pooler, so the pool keeps no
    # prepared statements across transactions (statement cache off; see db.create_pool).
    db_pooler: Literal["none", "session", "transaction"] = Field(default="none", alias="PAYSTREAM_DB_POOLER")
    # The fan-out engine between processes: unset, Postgres LISTEN/NOTIFY; nats://host:port
    # (comma-separated for several servers of one cluster), NATS JetStream
    # (push/listener_nats.py): no LISTEN connection, and commits take no NOTIFY lock. Every
    # node of a deployment must use the same engine.
    broker: str | None = Field(default=None, pattern=r"^(nats|tls)://", alias="PAYSTREAM_BROKER")
    # The JetStream stream's name and its subjects' prefix (<name>.changes.<transaction id>):
    # shared by the nodes of one deployment; another deployment on the same NATS uses another.
    broker_name: str = Field(default="paystream", pattern=r"^[A-Za-z0-9_-]{1,64}$", alias="PAYSTREAM_BROKER_NAME")
    # On SIGTERM, open streams end spread evenly over this many seconds (SSE streams end, WebSockets
    # close with 1012), so clients reconnect to the other nodes in a trickle; 0 ends them all at once.
    drain_seconds: float = Field(default=10.0, ge=0, le=3600, alias="PAYSTREAM_DRAIN_SECONDS")

    # --- signed webhooks to the merchant's backend (issue 12; outbound/delivery.py) ---
    # Every logged event is POSTed here as a Standard Webhooks message; needs the secret too.
    outbound_url: str | None = Field(default=None, alias="PAYSTREAM_OUTBOUND_URL")
    # The Standard Webhooks signing secret: whsec_ + base64 of ≥ 16 random bytes (24-64 advised).
    outbound_secret: str | None = Field(default=None, alias="PAYSTREAM_OUTBOUND_SECRET")
    # Multiplies every delay of the retry schedule (a test and operations knob: 0.001 runs
    # the whole ≥ 24 h schedule in about 2 minutes).
    outbound_backoff_scale: float = Field(default=1.0, gt=0, alias="PAYSTREAM_OUTBOUND_BACKOFF_SCALE")
    # Messages one process sends at once (each holds one database connection of its own).
    outbound_concurrency: int = Field(default=4, ge=1, le=64, alias="PAYSTREAM_OUTBOUND_CONCURRENCY")

    # --- client bounds and the operator port (issue 14) ---
    # Largest WebSocket message a client may send, in bytes; beyond it the socket closes with 1009.
    ws_max_message_bytes: int = Field(default=4096, ge=128, alias="PAYSTREAM_WS_MAX_MESSAGE")
    # Messages per second one WebSocket may send (a token bucket refilled at this rate,
    # holding up to the burst); beyond it the socket closes with 4029.
    ws_message_rate: float = Field(default=20.0, gt=0, alias="PAYSTREAM_WS_MESSAGE_RATE")
    ws_message_burst: int = Field(default=40, ge=1, alias="PAYSTREAM_WS_MESSAGE_BURST")
    # Seconds a connection has to deliver a whole request (line, headers and body) from
    # when it opened or its previous response was sent; then it is closed (after a 408 if
    # part of a request had arrived).
    header_timeout: float = Field(default=10.0, gt=0, alias="PAYSTREAM_HEADER_TIMEOUT")
    # Serve /metrics on this port (and host) instead of the public one, whose /metrics then
    # answers 404. Unset: /metrics on the public port, as before.
    metrics_port: int | None = Field(default=None, ge=1, le=65535, alias="PAYSTREAM_METRICS_PORT")
    metrics_host: str = Field(default="127.0.0.1", alias="PAYSTREAM_METRICS_HOST")

    # --- behind a load balancer (issue 13; auth/proxies.py) ---
    # Proxies (IPs or CIDR networks, comma-separated) whose X-Forwarded-For / Forwarded
    # header names the client, for per-address limits. Unset: trust no one, the TCP peer is
    # the client. uvicorn's own proxy-header handling is off (cli._run_uvicorn).
    trusted_proxies: str | None = Field(default=None, alias="PAYSTREAM_TRUSTED_PROXIES")

    @field_validator("trusted_proxies")
    @classmethod
    def _check_trusted_proxies(cls, value: str | None) -> str | None:
        from paystream.auth.proxies import parse_networks

        parse_networks(value)  # a bad item refuses to start, naming it
        return value

    @property
    def webhook_secrets(self) -> list[str]:
        """STRIPE_WEBHOOK_SECRET may list several secrets, comma-separated, for rotation."""
        raw = self.stripe_webhook_secret or ""
        return [s.strip() for s in raw.split(",") if s.strip()]

    def missing_secrets(self) -> list[str]:
        values = {
            "STRIPE_API_KEY": self.stripe_api_key,
            "STRIPE_WEBHOOK_SECRET": self.webhook_secrets,
            "PAYSTREAM_API_KEY": self.paystream_api_key,
            "PAYSTREAM_TOKEN_SECRET": self.paystream_token_secret,
        }
        return [name for name in REQUIRED_SECRETS if not values[name]]
