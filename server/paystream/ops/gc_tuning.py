"""Keep CPython's full garbage collections short while thousands of streams wait.

Each idle stream keeps ~120 objects the collector tracks (coroutine frames of the ASGI
stack, closures, the connection's protocol objects).  A full (generation 2) collection
walks every one of them: at 10,000 streams that stopped the process for 0.5-1 s (S1,
paystream_gc_pause_seconds), delaying every webhook and push behind it.

Streams are freed by reference counting when they end, not by the collector (measured:
closing 2,000 frozen streams left nothing frozen), so objects that have survived a full
collection can be moved out of the collector's sight with `gc.freeze()`: later full
collections walk only what is newer, and stay short.  What a frozen object could still
do is become part of a garbage cycle, which the collector would then not see; so once an
hour everything is thawed and the next full collection walks it all (one long pause an
hour instead of one every minute or so under load).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc

THAW_EVERY = 3600.0


class GcTuning:
    def __init__(self, thaw_every: float = THAW_EVERY) -> None:
        self.thaw_every = thaw_every
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thaw: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        gc.callbacks.append(self._after_collection)
        self._thaw = self._loop.create_task(self._thaw_forever(), name="paystream-gc-thaw")

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._after_collection)
        if self._thaw is not None:
            self._thaw.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._thaw

    def _after_collection(self, phase: str, info: dict[str, int]) -> None:
        # Everything still tracked has just survived a full collection.  Freeze from the
        # loop, not inside the collector's own callback.
        if phase == "stop" and info["generation"] == 2 and self._loop is not None:
            self._loop.call_soon_threadsafe(gc.freeze)

    @staticmethod
    def thaw() -> None:
        """Hand everything frozen back to the collector (its next full pass walks it all)."""
        gc.unfreeze()

    async def _thaw_forever(self) -> None:
        while True:
            await asyncio.sleep(self.thaw_every)
            self.thaw()
