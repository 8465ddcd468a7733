"""The client's address behind a load balancer.

`PAYSTREAM_TRUSTED_PROXIES` lists the proxies (IP addresses or CIDR networks,
comma-separated) whose `X-Forwarded-For` or `Forwarded` header is believed; by default
none is.  From any other peer the TCP peer is the client, whatever the request says.

From a trusted peer the header's addresses are walked right to left (each proxy appends
the address it received the request from) and the first one that is not itself a trusted
proxy is the client: everything to its left was written by the client and is not read.
An entry on that walk that is not an address (garbage, `unknown`, an obfuscated RFC 7239
identifier) gives up and the peer is used.  A request carrying both headers is believed
only if both name the same client: a proxy writes one of them, so a client that adds the
other to escape its own address ends up counted under the proxy's address instead.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from starlette.datastructures import Headers

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(raw: str | None) -> tuple[Network, ...]:
    """PAYSTREAM_TRUSTED_PROXIES as networks; ValueError naming the first bad item."""
    found = []
    for item in (raw or "").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            found.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or a network (CIDR) "
                             "in PAYSTREAM_TRUSTED_PROXIES") from None
    return tuple(found)


def _address(text: str) -> Address | None:
    """An address as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`,
    `[2001:db8::1]` or `[2001:db8::1]:4711`; None for anything else."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (end + 1 < len(text) and not text[end + 1:].startswith(":")):
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # IPv4 with a port
        text, _, port = text.partition(":")
        if not port.isdigit():
            return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:1.2.3.4 and 1.2.3.4 are one client
    return ip


def _split_quoted(text: str, sep: str) -> list[str]:
    """`text` split on `sep` outside double-quoted strings (RFC 7239 values may be quoted)."""
    parts, start, quoted, i = [], 0, False, 0
    while i < len(text):
        c = text[i]
        if c == '"':
            quoted = not quoted
        elif c == "\\" and quoted:
            i += 1
        elif c == sep and not quoted:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def forwarded_for(header: str) -> list[str | None]:
    """The `for=` value of each element of an RFC 7239 `Forwarded` header, left to right
    (None for an element without one)."""
    found: list[str | None] = []
    for element in _split_quoted(header, ","):
        value = None
        for pair in _split_quoted(element, ";"):
            name, eq, v = pair.partition("=")
            if eq and name.strip().lower() == "for":
                v = v.strip()
                if len(v) >= 2 and v[0] == v[-1] == '"':
                    v = v[1:-1].replace('\\"', '"').replace("\\\\", "\\")
                value = v
                break
        found.append(value)
    return found


class TrustedProxies:
    """The parsed setting: built once per process (it is on every stream's opening)."""

    __slots__ = ("networks",)

    def __init__(self, raw: str | None) -> None:
        self.networks = parse_networks(raw)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, ip: Address) -> bool:
        return any(ip in net for net in self.networks if net.version == ip.version)

    def _walk(self, entries: Sequence[str | None]) -> str | None:
        """The right-most entry that is not a trusted proxy (all trusted: the left-most);
        None if the walk meets something that is not an address, or there is none."""
        ip: Address | None = None
        for entry in reversed(entries):
            ip = _address(entry) if entry else None
            if ip is None:
                return None
            if not self.trusts(ip):
                return str(ip)
        return str(ip) if ip is not None else None

    def client(self, peer: str, headers: Headers) -> str:
        """The client's address for a request from `peer` carrying `headers`."""
        peer_ip = _address(peer)
        if peer_ip is None or not self.trusts(peer_ip):
            return peer
        xff = headers.getlist("x-forwarded-for")
        fwd = headers.getlist("forwarded")
        if not xff and not fwd:
            return peer
        from_xff = self._walk(",".join(xff).split(",")) if xff else None
        from_fwd = self._walk(forwarded_for(",".join(fwd))) if fwd else None
        if xff and fwd and from_xff != from_fwd:
            return peer  # one of the two was written by the client: neither is believed
        return from_xff or from_fwd or peer
