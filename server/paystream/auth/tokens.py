"""Stream tokens: HS256 JWTs with `exp` and `txn` and/or `cus` claims.

A merchant backend in any language can mint one with PAYSTREAM_TOKEN_SECRET, so the
browser gets a token without another round trip to us.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt


class TokenError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Grant:
    """What a caller may read: everything (the backend's API key) or a token's claims."""

    backend: bool = False
    txn: frozenset[str] = frozenset()
    cus: str | None = None

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


def verify(secret: str, token: str) -> Grant:
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["exp"]})
    except jwt.ExpiredSignatureError:
        raise TokenError("the stream token has expired") from None
    except jwt.InvalidTokenError:
        raise TokenError("the stream token is not valid") from None
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
    return Grant(txn=frozenset(txn), cus=cus)
