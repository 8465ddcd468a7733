"""Who is calling: the merchant backend (API key) or a browser (stream token)."""

from __future__ import annotations

import functools
import hmac

from starlette.requests import HTTPConnection

from paystream.auth import tokens
from paystream.auth.proxies import TrustedProxies
from paystream.auth.tokens import BACKEND, Grant
from paystream.errors import ApiError

# PAYSTREAM_TRUSTED_PROXIES parsed once per value (once per process in practice), not on
# every stream's opening.
_trusted = functools.lru_cache(maxsize=8)(TrustedProxies)


def address(conn: HTTPConnection) -> str:
    """The client's address: the TCP peer, or, when the peer is a trusted proxy
    (PAYSTREAM_TRUSTED_PROXIES), the client it names in X-Forwarded-For / Forwarded (see
    auth/proxies.py).  Everything keyed by client address goes through here; uvicorn's
    own proxy-header handling is off (cli._run_uvicorn), so scope["client"] is the peer."""
    peer = conn.client.host if conn.client else "unknown"
    proxies = _trusted(conn.app.state.settings.trusted_proxies)
    return proxies.client(peer, conn.headers) if proxies else peer


def _credential(conn: HTTPConnection) -> tuple[str | None, bool]:
    """The key or token presented, and whether it came in the Authorization header (a
    present header wins over ?token=)."""
    header = conn.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ApiError(401, "unauthorized", "use `Authorization: Bearer <key or token>`")
        return value.strip(), True
    return conn.query_params.get("token") or None, False


def presented(conn: HTTPConnection) -> bool:
    """Whether the request carries any credential (header or ?token=), good or not."""
    return bool(conn.headers.get("authorization") or conn.query_params.get("token"))


def _is_api_key(conn: HTTPConnection, credential: str) -> bool:
    key = conn.app.state.settings.paystream_api_key
    return bool(key) and hmac.compare_digest(credential.encode(), key.encode())


_KEY_IN_URL = "the API key is accepted only in the Authorization header, never in the URL"


def backend(conn: HTTPConnection) -> Grant:
    """Server-to-server calls: the API key, in the Authorization header, nothing else."""
    credential, in_header = _credential(conn)
    if credential is None:
        raise ApiError(401, "unauthorized", "an API key is required (Authorization: Bearer <key>)")
    if not in_header:
        raise ApiError(401, "unauthorized", _KEY_IN_URL)
    if not _is_api_key(conn, credential):
        raise ApiError(401, "unauthorized", "the API key is not valid")
    return BACKEND


def reader(conn: HTTPConnection, *, allow_backend: bool = True) -> Grant:
    """Reads and streams: the API key (where allowed, in the header only) or a stream
    token (in the header or ?token=)."""
    credential, in_header = _credential(conn)
    if credential is None:
        raise ApiError(401, "unauthorized", "a stream token is required (?token= or Authorization: Bearer)")
    if _is_api_key(conn, credential):
        if not in_header:
            raise ApiError(401, "unauthorized", _KEY_IN_URL)
        if allow_backend:
            return BACKEND
    return token(conn, credential)


def token(conn: HTTPConnection, credential: str) -> Grant:
    """A stream token's grant, or ApiError 401."""
    try:
        settings = conn.app.state.settings
        return tokens.verify(settings.paystream_token_secret, credential, settings.max_token_ttl)
    except tokens.TokenError as exc:
        raise ApiError(401, "unauthorized", str(exc)) from None
