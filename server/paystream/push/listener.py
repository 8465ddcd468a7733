"""The fan-out engine's listening side, as the hub sees it: connect and stay connected,
say whether it is ready, hand in notifications, and say "you may have missed some:
catch up" after every (re)connect.  Postgres LISTEN (listener_pg.py) and NATS JetStream
(listener_nats.py, PAYSTREAM_BROKER) implement it; another engine is one new file.

Nodes on different engines (or NATS streams) sharing a database do not hear each other's
changes, so each engine marks its Postgres connections with an application_name, and a
node starting up names any other engine it sees there (other_engines)."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable

import asyncpg

log = logging.getLogger("paystream.listener")

# The application_name of a LISTEN node's listening connection, and of a NATS node's pool.
LISTEN_MARK = "paystream-listener"
_NATS_MARK = "paystream-nats:"
_NAME_MAX = 63  # Postgres keeps this many bytes of an application_name


def nats_mark(broker_name: str) -> str:
    return (_NATS_MARK + broker_name)[:_NAME_MAX]


def _describe(mark: str) -> str:
    return "LISTEN/NOTIFY (no PAYSTREAM_BROKER)" if mark == LISTEN_MARK else \
        f"NATS stream {mark.removeprefix(_NATS_MARK)!r}"


async def other_engines(pool: asyncpg.Pool, own_mark: str) -> dict[str, int]:
    """Connections of paystream nodes on another engine (or NATS stream) on this database,
    by what they are: {"LISTEN/NOTIFY …": 2, "NATS stream 'x'": 10}.  Only what Postgres
    sees: behind a transaction pooler a NATS node's connections may not carry their mark."""
    rows = await pool.fetch(
        """SELECT application_name AS mark, count(*) AS n FROM pg_stat_activity
            WHERE datname = current_database() AND application_name <> $1
              AND (application_name = $2 OR starts_with(application_name, $3))
            GROUP BY 1 ORDER BY 1""", own_mark[:_NAME_MAX], LISTEN_MARK, _NATS_MARK)
    return {_describe(r["mark"]): r["n"] for r in rows}


async def warn_of_other_engines(pool: asyncpg.Pool, own_mark: str) -> dict[str, int]:
    """At start-up: one ERROR line if nodes on another engine share this database (their
    browsers and ours would get each other's changes only on reconnecting)."""
    others = await other_engines(pool, own_mark)
    if others:
        log.error("nodes on another fan-out engine share this database: %s; this node is on %s."
                  " Nodes on different engines do not hear each other's changes (their browsers get them only"
                  " on reconnecting): give every node the same PAYSTREAM_BROKER and PAYSTREAM_BROKER_NAME",
                  ", ".join(f"{what} ({n} connection{'s' * (n != 1)})" for what, n in others.items()),
                  _describe(own_mark[:_NAME_MAX]))
    return others

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
