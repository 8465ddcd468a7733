"""A test control, not a Stripe resource: POST /_test/webhooks/hold keeps every webhook
the emulator would post until POST /_test/webhooks/release (each then goes out as it would
have, a second after).  Stripe delivers "1-5 s later" and sometimes much later: a test
that must act before the webhook lands holds it instead of racing localstripe's fixed
one-second delay."""

from __future__ import annotations

import asyncio
from types import ModuleType
from typing import Any


def install(server: ModuleType) -> None:
    from localstripe import webhooks

    send = webhooks._send_webhook  # schedule_webhook looks the name up at each call
    released = asyncio.Event()
    released.set()

    async def held_send(event: Any) -> None:
        await released.wait()
        await send(event)

    webhooks._send_webhook = held_send

    async def hold(_request: Any) -> Any:
        released.clear()
        return server.json_response({"held": True})

    async def release(_request: Any) -> Any:
        released.set()
        return server.json_response({"held": False})

    server.app.router.add_post("/_test/webhooks/hold", hold)
    server.app.router.add_post("/_test/webhooks/release", release)
