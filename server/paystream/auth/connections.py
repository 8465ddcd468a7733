"""Open connections per client address, and descriptors kept for the server's own use.

Before, nothing bounded the connections one address held but the file limit: 150 idle
connections under a limit of 96 descriptors took them all, and `/readyz` (and the
database pool's reconnects) failed until the header deadline closed them (issue 22).

Each connection is judged as it is accepted (auth/deadlines.BoundedHttpProtocol), before
any of its request is read, so all that is known is its TCP peer:

- one address may hold PAYSTREAM_MAX_CONNECTIONS_PER_ADDRESS open connections (HTTP and
  WebSocket) in a process; one more is answered `429 too_many_connections` and closed at
  once.  A peer in PAYSTREAM_TRUSTED_PROXIES is not capped by its own address: its
  connections carry many clients, whose streams are limited per forwarded address
  (PAYSTREAM_MAX_STREAMS_PER_ADDRESS) once their requests are read.
- descriptors: of the process's file limit (RLIMIT_NOFILE), `reserve_for_server` are never
  given to clients (the database pool, the outbound senders, the LISTEN or NATS
  connection, Stripe calls, log files), and HEALTH_ROOM more only to health checks.  Linux
  gives a new socket the lowest free descriptor, so a socket numbered into the reserve
  means fewer free descriptors than that are left.  A connection landing in the health
  room is kept only if its address holds no other connection (or is a trusted proxy),
  and it is served only `/healthz` and `/readyz`, once; anything else there, and every
  connection beyond it, is answered `503 server_busy` and closed.
"""

from __future__ import annotations

import functools
import logging
import resource
import time
from dataclasses import dataclass

from prometheus_client import Counter

from paystream.auth.proxies import TrustedProxies, _address

log = logging.getLogger("paystream.connections")

REFUSED = Counter("paystream_connections_refused_total",
                  "Connections refused as they were accepted, by reason (address: over the per-address cap; "
                  "descriptors: near the file limit)", ["reason"])

# Descriptors for what the server opens itself beyond its database pool and outbound
# senders: the LISTEN (or NATS) connection, Stripe calls, the metrics port, log files.
OWN_SPARE = 16
# Descriptors beyond that which only health checks may take.
HEALTH_ROOM = 8
HEALTH_PATHS = frozenset({b"/healthz", b"/readyz"})
# Near the file limit the log says so at most this often.
WARN_EVERY = 60.0


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str
    code: str
    message: str


@dataclass(frozen=True)
class Admission:
    key: str | None  # the address it is counted under (None: not counted, e.g. a Unix socket)
    health_only: bool = False  # in the health room: /healthz and /readyz only, once
    refusal: Refusal | None = None  # refused: this answer, then close


class ConnectionLimits:
    """The counts of one process."""

    def __init__(self, per_address: int, trusted: TrustedProxies, file_limit: int, reserve: int) -> None:
        self.per_address = per_address
        self.trusted = trusted
        self.file_limit = file_limit
        self.busy_from = file_limit - reserve  # descriptors from here on: no client
        self.health_from = self.busy_from - HEALTH_ROOM  # from here on: health checks only
        self.open: dict[str, int] = {}
        self.warned = -WARN_EVERY

    def admit(self, peer: object, fd: int) -> Admission:
        """Judge a connection just accepted from `peer` on descriptor `fd`; an admitted one
        is counted until release()."""
        host = peer[0] if isinstance(peer, tuple) and peer and isinstance(peer[0], str) else None
        ip = _address(host) if host is not None else None
        key = str(ip) if ip is not None else None
        trusted = ip is not None and self.trusted.trusts(ip)
        held = self.open.get(key, 0) if key is not None else 0
        if fd >= self.health_from:
            self.warn_near_limit(fd)
            if fd >= self.busy_from or (held and not trusted):
                return Admission(None, refusal=self.busy())
            self.count(key)
            return Admission(key, health_only=True)
        if key is not None and not trusted and held >= self.per_address:
            REFUSED.labels("address").inc()
            return Admission(None, refusal=Refusal(
                429, "Too Many Requests", "too_many_connections",
                f"over {self.per_address} open connections from this address"))
        self.count(key)
        return Admission(key)

    @staticmethod
    def busy() -> Refusal:
        REFUSED.labels("descriptors").inc()
        return Refusal(503, "Service Unavailable", "server_busy",
                       "the server is near its limit of open files; try again shortly")

    def count(self, key: str | None) -> None:
        if key is not None:
            self.open[key] = self.open.get(key, 0) + 1

    def release(self, key: str | None) -> None:
        if key is None:
            return
        left = self.open.get(key, 0) - 1
        if left > 0:
            self.open[key] = left
        else:
            self.open.pop(key, None)

    def warn_near_limit(self, fd: int) -> None:
        now = time.monotonic()
        if now - self.warned >= WARN_EVERY:
            self.warned = now
            log.warning("near the limit of open files (descriptor %d of %d): new connections get "
                        "503 server_busy, health checks excepted; raise the limit (ulimit -n) or lower "
                        "PAYSTREAM_MAX_CONNECTIONS_PER_ADDRESS", fd, self.file_limit)


def file_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


@functools.cache
def limits() -> ConnectionLimits:
    """This process's, from its settings (read once, like the other bounds below the app)."""
    from paystream.config import Settings

    settings = Settings()
    reserve = settings.db_pool_size + settings.outbound_concurrency + OWN_SPARE
    return ConnectionLimits(settings.max_connections_per_address, TrustedProxies(settings.trusted_proxies),
                            file_limit(), reserve)
