"""Settings from the environment (names are part of the public contract)."""

from __future__ import annotations

from pydantic import Field
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
    max_header_bytes: int = Field(default=16 * 1024, alias="PAYSTREAM_MAX_HEADER_BYTES")
    long_poll_max_seconds: float = 60.0
    db_pool_size: int = Field(default=10, alias="PAYSTREAM_DB_POOL")
    # The sweeper re-checks processing / requires_action transactions older than this.
    stuck_after_seconds: float = Field(default=900, alias="PAYSTREAM_STUCK_AFTER")
    recovery_interval_seconds: float = Field(default=60, alias="PAYSTREAM_RECOVERY_INTERVAL")
    # Merchant effects, comma-separated: module:attribute or sql:schema.function (see
    # paystream.effects); the built-ins and installed entry points run as well.
    effects: str | None = Field(default=None, alias="PAYSTREAM_EFFECTS")

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
