"""Who is calling: the merchant backend (API key) or a browser (stream token)."""

from __future__ import annotations

import hmac

from starlette.requests import HTTPConnection

from paystream.auth import tokens
from paystream.auth.tokens import BACKEND, Grant
from paystream.errors import ApiError


def credential(conn: HTTPConnection) -> str:
    """The key or token the caller presented (after reader() or backend() accepted it)."""
    return _credential(conn) or ""


def address(conn: HTTPConnection) -> str:
    return conn.client.host if conn.client else "unknown"


def _credential(conn: HTTPConnection) -> str | None:
    header = conn.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ApiError(401, "unauthorized", "use `Authorization: Bearer <key or token>`")
        return value.strip()
    return conn.query_params.get("token") or None


def _is_api_key(conn: HTTPConnection, credential: str) -> bool:
    key = conn.app.state.settings.paystream_api_key
    return bool(key) and hmac.compare_digest(credential.encode(), key.encode())


def backend(conn: HTTPConnection) -> Grant:
    """Server-to-server calls: the API key, nothing else."""
    credential = _credential(conn)
    if credential is None:
        raise ApiError(401, "unauthorized", "an API key is required")
    if not _is_api_key(conn, credential):
        raise ApiError(401, "unauthorized", "the API key is not valid")
    return BACKEND


def reader(conn: HTTPConnection, *, allow_backend: bool = True) -> Grant:
    """Reads and streams: the API key (where allowed) or a stream token."""
    credential = _credential(conn)
    if credential is None:
        raise ApiError(401, "unauthorized", "a stream token is required (?token= or Authorization: Bearer)")
    if allow_backend and _is_api_key(conn, credential):
        return BACKEND
    try:
        return tokens.verify(conn.app.state.settings.paystream_token_secret, credential)
    except tokens.TokenError as exc:
        raise ApiError(401, "unauthorized", str(exc)) from None
