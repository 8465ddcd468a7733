"""uvicorn's WebSocket protocol, minus its close-everything-at-once on shutdown.

On SIGTERM uvicorn calls shutdown() on every connection: an open WebSocket is closed with
1012 there and then, so every socket of the node would reconnect elsewhere in one wave.
With a drain (PAYSTREAM_DRAIN_SECONDS > 0) the app closes each socket itself, with 1012, in
its turn (Hub.drain); this protocol leaves an open socket alone then, and closes it as
uvicorn would only if it is still open a second after the drain should have ended.  A
socket still in its handshake is refused at once, as before.

`paystream serve` (cli._run_uvicorn) runs uvicorn with `ws=` this class.
"""

from __future__ import annotations

import asyncio
import functools

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


@functools.cache
def _drain_seconds() -> float:
    from paystream.config import Settings

    return Settings().drain_seconds


class DrainingWebSocketProtocol(WebSocketsSansIOProtocol):
    _fallback: asyncio.TimerHandle | None = None

    def shutdown(self) -> None:
        seconds = _drain_seconds()
        if seconds > 0 and self.handshake_complete and not self.close_sent and self._fallback is None:
            self._fallback = asyncio.get_running_loop().call_later(seconds + 1, super().shutdown)
            return
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._fallback is not None:
            self._fallback.cancel()
        super().connection_lost(exc)
