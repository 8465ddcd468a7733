"""The design paystream replaces, for S4: a server-side long-poll that re-reads the
database every 500 ms until the status changes (or 25 s pass).  Run by s4_polling.py.

    DATABASE_URL=… python bench/baseline_server.py PORT
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator

import asyncpg
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

pool: asyncpg.Pool | None = None


async def poll(request: Request) -> JSONResponse:
    assert pool is not None
    pi, since = request.path_params["pi"], request.query_params.get("since")
    deadline = time.monotonic() + 25
    while True:
        status = await pool.fetchval("SELECT status FROM transactions WHERE stripe_id = $1", pi)
        if status != since or time.monotonic() > deadline:
            return JSONResponse({"status": status})
        await asyncio.sleep(0.5)  # the baseline's own re-read interval: this is the design measured


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global pool
    pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=5, max_size=20)
    yield
    await pool.close()


app = Starlette(routes=[Route("/poll/{pi}", poll)], lifespan=lifespan)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", loop="uvloop", http="httptools")
