"""The client address behind a load balancer: PAYSTREAM_TRUSTED_PROXIES, X-Forwarded-For and
RFC 7239 Forwarded (issue 13).  The whole-system side is tests/e2e/test_load_balancer.py."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import HTTPConnection

from paystream.auth import access
from paystream.auth.proxies import TrustedProxies, forwarded_for, parse_networks
from paystream.config import Settings

LB = "10.0.0.2"
PROXIES = TrustedProxies("10.0.0.0/24, 192.168.7.1, 2001:db8:1::/48")


def client(peer: str, *pairs: tuple[str, str], proxies: TrustedProxies = PROXIES) -> str:
    headers = Headers(raw=[(k.lower().encode(), v.encode()) for k, v in pairs])
    return proxies.client(peer, headers)


def test_the_setting_parses_ips_and_networks_and_names_a_bad_item() -> None:
    assert [str(n) for n in parse_networks(" 10.0.0.0/8, 127.0.0.1 ,::1,, 2001:db8::/32 ")] == [
        "10.0.0.0/8", "127.0.0.1/32", "::1/128", "2001:db8::/32"]
    assert parse_networks(None) == parse_networks("") == parse_networks(" , ") == ()
    assert parse_networks("10.1.2.3/8") == parse_networks("10.0.0.0/8")  # host bits allowed
    with pytest.raises(ValueError, match="'lb.internal' is not an IP address"):
        parse_networks("10.0.0.1, lb.internal")
    with pytest.raises(ValueError, match="'\\*'"):
        parse_networks("*")  # trusting everyone must be written as networks, on purpose


def test_settings_refuse_a_bad_value_and_default_to_trusting_no_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYSTREAM_TRUSTED_PROXIES", "10.0.0.0/33")
    with pytest.raises(ValidationError, match="PAYSTREAM_TRUSTED_PROXIES"):
        Settings()
    monkeypatch.setenv("PAYSTREAM_TRUSTED_PROXIES", "10.0.0.1,::1")
    assert Settings().trusted_proxies == "10.0.0.1,::1"
    monkeypatch.delenv("PAYSTREAM_TRUSTED_PROXIES")
    assert Settings().trusted_proxies is None
    assert not TrustedProxies(Settings().trusted_proxies)


def test_an_untrusted_peer_is_the_client_whatever_it_sends() -> None:
    spoof = ("X-Forwarded-For", "203.0.113.9")
    assert client("198.51.100.4", spoof) == "198.51.100.4"
    assert client("198.51.100.4", ("Forwarded", "for=203.0.113.9")) == "198.51.100.4"
    assert client(LB, spoof, proxies=TrustedProxies(None)) == LB  # the default trusts no one
    assert client("unknown", spoof) == "unknown"  # no TCP peer (a unix socket)


def test_x_forwarded_for_is_walked_right_to_left_past_trusted_proxies() -> None:
    assert client(LB, ("X-Forwarded-For", "203.0.113.9")) == "203.0.113.9"
    # Two balancers in a row, both trusted: the address the outer one saw.
    assert client(LB, ("X-Forwarded-For", "203.0.113.9, 192.168.7.1")) == "203.0.113.9"
    # The client wrote the left part itself: never read past the first untrusted address.
    assert client(LB, ("X-Forwarded-For", "1.1.1.1, 203.0.113.9")) == "203.0.113.9"
    assert client(LB, ("X-Forwarded-For", "not an ip, 203.0.113.9")) == "203.0.113.9"
    # Several header lines are one list, in order.
    assert client(LB, ("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "203.0.113.9")) == "203.0.113.9"
    # Every hop trusted: the furthest one is the client.
    assert client(LB, ("X-Forwarded-For", "10.0.0.7, 192.168.7.1")) == "10.0.0.7"
    # Ports and IPv6, bracketed or not; an IPv4-mapped peer or entry is its IPv4 address.
    assert client(LB, ("X-Forwarded-For", "203.0.113.9:4711")) == "203.0.113.9"
    assert client(LB, ("X-Forwarded-For", "2001:db8:2::5")) == "2001:db8:2::5"
    assert client(LB, ("X-Forwarded-For", "[2001:db8:2::5]:443")) == "2001:db8:2::5"
    assert client("::ffff:10.0.0.2", ("X-Forwarded-For", "::ffff:203.0.113.9")) == "203.0.113.9"
    assert client("2001:db8:1::9", ("X-Forwarded-For", "203.0.113.9")) == "203.0.113.9"


def test_a_malformed_or_empty_header_falls_back_to_the_peer() -> None:
    for bad in ("", " ", "garbage", "203.0.113.9, garbage", "203.0.113.9,", "1.2.3.4:http",
                "[2001:db8::1", "[2001:db8::1]x", "unknown", "300.1.1.1"):
        assert client(LB, ("X-Forwarded-For", bad)) == LB, bad
    assert client(LB) == LB  # a trusted peer that names no one (a health check)


def test_rfc_7239_forwarded() -> None:
    assert forwarded_for('for=192.0.2.60;proto=http;by=203.0.113.43, for="[2001:db8:cafe::17]:4711"') == [
        "192.0.2.60", "[2001:db8:cafe::17]:4711"]
    assert forwarded_for('by="a,b";for=1.2.3.4, proto=https') == ["1.2.3.4", None]
    assert forwarded_for('FOR="1.2.3.4:80"') == ["1.2.3.4:80"]
    assert client(LB, ("Forwarded", "for=203.0.113.9;proto=https")) == "203.0.113.9"
    assert client(LB, ("Forwarded", 'for=1.1.1.1, for="203.0.113.9:1234";by=10.0.0.2')) == "203.0.113.9"
    assert client(LB, ("Forwarded", 'for="[2001:db8:cafe::17]:4711", for=192.168.7.1')) == "2001:db8:cafe::17"
    # unknown, obfuscated identifiers and elements without for=: the peer.
    for bad in ("for=unknown", "for=_hidden", "proto=https", "for=", 'for="1.2.3.4'):
        assert client(LB, ("Forwarded", bad)) == LB, bad


def test_both_headers_are_believed_only_when_they_agree() -> None:
    agree = [("X-Forwarded-For", "203.0.113.9"), ("Forwarded", "for=203.0.113.9")]
    assert client(LB, *agree) == "203.0.113.9"
    # The balancer appends to X-Forwarded-For; the client adds a Forwarded of its own (or
    # the other way round): neither is believed, and the client gains no address.
    assert client(LB, ("X-Forwarded-For", "203.0.113.9"), ("Forwarded", "for=1.1.1.1")) == LB
    assert client(LB, ("X-Forwarded-For", "1.1.1.1, 203.0.113.9"), ("Forwarded", "for=1.1.1.1")) == LB
    assert client(LB, ("X-Forwarded-For", "203.0.113.9"), ("Forwarded", "proto=https")) == LB


def _connection(trusted: str | None, peer: tuple[str, int] | None, headers: list[tuple[bytes, bytes]]) -> HTTPConnection:
    app = Starlette()
    app.state.settings = Settings(PAYSTREAM_TRUSTED_PROXIES=trusted)
    return HTTPConnection({"type": "http", "app": app, "client": peer, "headers": headers,
                           "path": "/", "query_string": b""})


def test_access_address_goes_through_the_setting() -> None:
    xff = [(b"x-forwarded-for", b"203.0.113.9")]
    assert access.address(_connection(None, ("127.0.0.1", 5000), xff)) == "127.0.0.1"
    assert access.address(_connection("127.0.0.1", ("127.0.0.1", 5000), xff)) == "203.0.113.9"
    assert access.address(_connection("127.0.0.1", ("127.0.0.2", 5000), xff)) == "127.0.0.2"
    assert access.address(_connection("127.0.0.1", None, xff)) == "unknown"
