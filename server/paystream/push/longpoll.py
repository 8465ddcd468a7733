"""GET /v1/transactions/{id}: a plain read, or a long-poll with ?await= (a status) and/or
?after= (a seq: any change logged after it, a status or not, such as a subscription's
cancel_at_period_end or a new decline's error)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from paystream.auth import access
from paystream.changes import store
from paystream.changes.lifecycle import ALL_STATUSES, ENDS
from paystream.errors import ApiError
from paystream.ops import metrics
from paystream.push.hub import Hub
from paystream.push.streams import cursor, open_stream, read_covered, state_of


async def _client_gone(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def get_transaction(request: Request) -> JSONResponse:
    grant = access.reader(request)
    any_id = request.path_params["id"]
    wanted = request.query_params.get("await")
    after = cursor(request.query_params.get("after"), "after")
    if wanted is None and after is None:
        return JSONResponse(store.render(await read_covered(request.app.state.pool, grant, any_id)))

    targets = {s.strip() for s in (wanted or "").split(",") if s.strip()}
    unknown = targets - set(ALL_STATUSES)
    if (wanted is not None and not targets) or unknown:
        raise ApiError(400, "bad_request", f"await takes statuses from {sorted(ALL_STATUSES)}")
    targets |= ENDS

    def answered(state: dict[str, Any]) -> bool:
        return state["status"] in targets or (after is not None and state["seq"] > after)

    limit = request.app.state.settings.long_poll_max_seconds
    try:
        timeout = float(request.query_params.get("timeout", "25"))
    except ValueError:
        timeout = -1
    if not 0 <= timeout <= limit:
        raise ApiError(400, "bad_request", f"timeout must be between 0 and {limit:g} seconds")

    row, sub, release = await open_stream(request, any_id, grant, None)
    hub: Hub = request.app.state.hub
    state = store.render(row)
    gone = asyncio.create_task(_client_gone(request))
    metrics.CONNECTIONS.labels("long_poll").inc()
    if grant.exp is not None:  # never wait past the token's expiry
        timeout = max(0.0, min(timeout, grant.exp - time.time()))
    try:
        async with asyncio.timeout(timeout):
            while not answered(state):
                getter = asyncio.ensure_future(sub.get())
                await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone.done():
                    getter.cancel()
                    return JSONResponse(state)  # nobody reads it; stop waiting at once
                item = getter.result()
                if item is None:
                    break  # shutting down: answer with what we know
                state = state_of(item[2])
    except TimeoutError:
        return JSONResponse({**state, "timed_out": True})
    finally:
        gone.cancel()
        hub.unsubscribe(sub)
        release()
        metrics.CONNECTIONS.labels("long_poll").dec()
    return JSONResponse({**state, "timed_out": not answered(state)})


