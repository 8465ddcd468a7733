"""Stream tokens: HS256 JWTs with `exp` and `txn` and/or `cus` claims.

A merchant backend in any language can mint one with PAYSTREAM_TOKEN_SECRET, so the
browser gets a token without another round trip to us.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.utils import base64url_decode


class TokenError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Grant:
    """What a caller may read: everything (the backend's API key) or a token's claims.

    `exp` is the token's expiry (Unix seconds; None for the API key). `key` names the
    token, not its spelling: the decoded signature, which is the HMAC of the exact signed
    text, so every spelling that verifies (an `=` appended, other unused trailing bits)
    has the same key.  Per-token limits count by it."""

    backend: bool = False
    txn: frozenset[str] = frozenset()
    cus: str | None = None
    exp: float | None = None
    key: bytes = b""

    def expired(self, now: float | None = None) -> bool:
        """At or past `exp` (RFC 7519: the token is good before its expiry time)."""
        return self.exp is not None and (time.time() if now is None else now) >= self.exp

    def may_name(self, any_id: str) -> bool:
        """Whether the transaction `any_id` names could be covered, decided before reading
        it.  A transaction has one `txn_` id and one Stripe id and a token may list either,
        so an unlisted id is worth reading only when the token lists an id of the other
        kind; the read then decides (allows), with 403 for what is not covered."""
        if self.backend or self.cus is not None or any_id in self.txn:
            return True
        ours = any_id.startswith("txn_")
        return any(listed.startswith("txn_") != ours for listed in self.txn)

    def allows(self, txn_id: str, stripe_id: str | None, customer_id: str | None) -> bool:
        if self.backend:
            return True
        if txn_id in self.txn or (stripe_id is not None and stripe_id in self.txn):
            return True
        return self.cus is not None and customer_id == self.cus


BACKEND = Grant(backend=True)


def mint(secret: str, *, txn: list[str] | None = None, cus: str | None = None,
         ttl_seconds: int = 3600) -> tuple[str, int]:
    if not txn and not cus:
        raise ValueError("a stream token needs transaction ids or a customer id")
    exp = int(time.time()) + int(ttl_seconds)
    claims: dict[str, Any] = {"exp": exp}
    if txn:
        claims["txn"] = list(txn)
    if cus:
        claims["cus"] = cus
    return jwt.encode(claims, secret, algorithm="HS256"), exp


_TIME_CLAIMS = ("exp", "nbf", "iat")

# Clocks of the merchant's backend and ours may differ a little.
CLOCK_LEEWAY = 60


def verify(secret: str, token: str, max_ttl: float | None = None) -> Grant:
    """The token's grant; TokenError if it is not ours, has no `exp`, has expired, or (with
    max_ttl, PAYSTREAM_MAX_TOKEN_TTL) expires further ahead than any token may live."""
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["exp"]})
    except jwt.ExpiredSignatureError:
        raise TokenError("the stream token has expired") from None
    except jwt.MissingRequiredClaimError:
        raise TokenError("the stream token has no exp claim") from None
    except jwt.InvalidTokenError:
        raise TokenError("the stream token is not valid") from None
    # PyJWT reads a time claim with int(), so "9999999999" (a string) passes its checks and
    # then breaks every comparison made with it here and in the streams.  RFC 7519's
    # NumericDate is a JSON number: anything else is a malformed token, 401.
    for name in _TIME_CLAIMS:
        value = claims.get(name)
        if name in claims and (isinstance(value, bool) or not isinstance(value, int | float)
                               or not math.isfinite(value)):
            raise TokenError(f"the token's {name} claim must be a number (seconds since the epoch)")
    if max_ttl is not None and claims["exp"] > time.time() + max_ttl + CLOCK_LEEWAY:
        raise TokenError(f"the stream token lives longer than {max_ttl:g} s (PAYSTREAM_MAX_TOKEN_TTL)")
    txn = claims.get("txn", [])
    cus = claims.get("cus")
    if isinstance(txn, str):
        txn = [txn]
    if not isinstance(txn, list) or not all(isinstance(t, str) for t in txn):
        raise TokenError("the token's txn claim must be a list of ids")
    if cus is not None and not isinstance(cus, str):
        raise TokenError("the token's cus claim must be a customer id")
    if not txn and not cus:
        raise TokenError("the token grants no transaction")
    return Grant(txn=frozenset(txn), cus=cus, exp=float(claims["exp"]), key=_signature(token))


def _signature(token: str) -> bytes:
    """The signature's bytes (only called on a token that verified, so it decodes)."""
    return base64url_decode(token.rpartition(".")[2].encode("ascii", "replace"))
