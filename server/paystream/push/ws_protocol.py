"""uvicorn's WebSocket protocol, minus its close-everything-at-once on shutdown, and with
closes that end the connection even when the client does not read or is still sending.

On SIGTERM uvicorn calls shutdown() on every connection: an open WebSocket is closed with
1012 there and then, so every socket of the node would reconnect elsewhere in one wave.
With a drain (PAYSTREAM_DRAIN_SECONDS > 0) the app closes each socket itself, with 1012, in
its turn (Hub.drain); this protocol leaves an open socket alone then, and closes it as
uvicorn would only if it is still open a second after the drain should have ended.  A
socket still in its handshake is refused at once, as before.

A client that stops reading: uvicorn's transport.close() waits until every queued byte is
written, which for such a client is never, and a close frame waits behind everything it
has not read, so a socket the app had given up on stayed open (and counted) for good.
Here every close of the transport is aborted if the connection is still open
CLOSE_GRACE seconds later, and an app's close frame that cannot be written within
CLOSE_GRACE ends the connection without it (the app hears a 1006 disconnect).

A message over the size bound that arrives in many frames: websockets fails it with 1009
as for one large frame, but uvicorn then closed the socket at once, while the client was
still sending fragments: their bytes drew a reset, and the client lost the close frame
(it saw 1006).  Here the server sends the close frame and its end of the stream, and
reads and drops what the client still sends, until the client closes, CLOSE_GRACE
passes, or DISCARD_BYTES have been dropped (then it is aborted).

`paystream serve` (cli._run_uvicorn) runs uvicorn with `ws=` this class.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from paystream.push.streams import CLOSE_GRACE, abort

# What a client may still send after its message was refused as too big, read and dropped
# so that it can read the close frame: the rest of a message somewhat over the bound.
DISCARD_BYTES = 1 << 20


@functools.cache
def _drain_seconds() -> float:
    from paystream.config import Settings

    return Settings().drain_seconds


class _Transport:
    """The connection's transport as uvicorn's protocol sees it, but whose close() cannot
    hang: the connection is aborted if it is still open CLOSE_GRACE seconds later."""

    __slots__ = ("_transport", "_protocol")

    def __init__(self, transport: asyncio.Transport, protocol: DrainingWebSocketProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def write(self, data: bytes) -> None:
        self._transport.write(data)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._transport.close()
        self._protocol.abort_later()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class DrainingWebSocketProtocol(WebSocketsSansIOProtocol):
    _fallback: asyncio.TimerHandle | None = None
    _abort_timer: asyncio.TimerHandle | None = None
    _discarded = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(_Transport(transport, self))  # type: ignore[arg-type]

    def shutdown(self) -> None:
        seconds = _drain_seconds()
        if seconds > 0 and self.handshake_complete and not self.close_sent and self._fallback is None:
            self._fallback = asyncio.get_running_loop().call_later(seconds + 1, super().shutdown)
            return
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._fallback is not None:
            self._fallback.cancel()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        super().connection_lost(exc)

    def abort_later(self) -> None:
        if self._abort_timer is None and not self.disconnected:
            self._abort_timer = self.loop.call_later(CLOSE_GRACE, self.cut_off)

    def cut_off(self) -> None:
        self._abort_timer = None
        if not self.disconnected:
            abort(self.transport._transport)  # type: ignore[attr-defined]

    async def send(self, message: ASGISendEvent) -> None:
        if (message["type"] == "websocket.close" and not self.writable.is_set() and self.handshake_complete
                and not self.close_sent and self.initial_response is None and not self.disconnected):
            # The client has not read what is queued for it: the close frame would wait
            # behind it.  A few seconds for the client to catch up, then it is cut off.
            try:
                await asyncio.wait_for(self.writable.wait(), CLOSE_GRACE)
            except TimeoutError:
                self.close_sent = True
                self.cut_off()  # connection_lost tells the app: websocket.disconnect, 1006
                return
        await super().send(message)

    def data_received(self, data: bytes) -> None:
        if self.close_sent and self.conn.parser_exc is not None:
            self._discarded += len(data)
            if self._discarded > DISCARD_BYTES:
                self.cut_off()
            else:
                self.conn.receive_data(data)  # failed: the parser only drops what still comes
            return
        super().data_received(data)

    def handle_parser_exception(self) -> None:
        """As uvicorn (the app hears the close code, the close frame is sent), but the
        connection stays open for reading until the client closes it (or CLOSE_GRACE):
        closing it under a client still sending makes the kernel reset it, and the client
        then loses the close frame."""
        assert self.conn.close_sent is not None
        self.queue.put_nowait({"type": "websocket.disconnect", "code": self.conn.close_sent.code,
                               "reason": self.conn.close_sent.reason})
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.stop_keepalive()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        # The app's end (run_asgi) leaves the transport to this timer; the client's EOF
        # (eof_received) usually closes it first.
        self.close_timer = self.loop.call_later(CLOSE_GRACE, self.transport.close)
