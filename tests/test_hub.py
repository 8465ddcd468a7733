"""The hub in-process against real Postgres: readiness follows the listener."""

from __future__ import annotations

import asyncpg
import httpx

from paystream.app import create_app
from paystream.config import Settings
from tests.support import wait_until


async def test_readyz_is_503_while_the_listener_cannot_reconnect(database_url: str, db: asyncpg.Connection) -> None:
    settings = Settings(database_url=database_url, stripe_webhook_secret="whsec_x",
                        paystream_api_key="k", paystream_token_secret="t" * 32)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub") as client:
            async def status() -> int:
                return (await client.get("/readyz")).status_code

            assert await status() == 200
            hub = app.state.hub
            hub.listener._dsn = "postgresql://postgres@127.0.0.1:1/nowhere"  # every reconnect now fails
            await db.execute("SELECT pg_terminate_backend($1)", hub.listener._conn.get_server_pid())
            await wait_until(lambda: _is(status, 503), timeout=5, what="/readyz to report the dead listener")
            body = (await client.get("/readyz")).json()
            assert body["checks"] == {"database": True, "listener": False, "schema": True}
            hub.listener._dsn = database_url
            await wait_until(lambda: _is(status, 200), timeout=10, what="the listener to come back")


async def _is(status, expected: int) -> bool:  # noqa: ANN001
    return await status() == expected
