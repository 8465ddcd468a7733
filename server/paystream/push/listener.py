"""The fan-out engine's listening side, as the hub sees it: connect and stay connected,
say whether it is ready, hand in notifications, and say "you may have missed some:
catch up" after every (re)connect.  Postgres LISTEN (listener_pg.py) is the one
implementation today; another engine is one new file implementing this."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable

# A change was committed: (transaction id, its new seq, its status, and the pushed event's
# JSON text when the engine carried it — else None, and the hub reads the log).
OnChange = Callable[[str, int, str | None, str | None], None]
# Notifications may have been missed (a (re)connect): read what the log holds.  It runs
# after listening is in place, so a change committed meanwhile is in the read or
# notified after it; if it raises, the listener counts the connection as failed.
OnGap = Callable[[], Awaitable[None]]


class Listener(ABC):
    @abstractmethod
    async def start(self, on_change: OnChange, on_gap: OnGap) -> None:
        """Begin connecting (in the background) and keep the connection up."""

    @property
    @abstractmethod
    def ready(self) -> bool:
        """True while notifications are being heard."""

    @abstractmethod
    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the first connection; return ready."""

    @abstractmethod
    async def stop(self) -> None:
        """Disconnect and stop reconnecting."""
