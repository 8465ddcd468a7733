"""A component's one background task for the life of the process (the outbox and
sweeper, the backfill): start() it in the app's lifespan, stop() it on the way out."""

from __future__ import annotations

import asyncio
import contextlib


class BackgroundTask:
    task_name = "paystream-background"
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._forever(), name=self.task_name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _forever(self) -> None:
        raise NotImplementedError
