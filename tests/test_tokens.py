from __future__ import annotations

import time

import jwt
import pytest

from paystream.auth import tokens

SECRET = "s" * 32


def test_round_trip_and_claims() -> None:
    token, exp = tokens.mint(SECRET, txn=["txn_A", "pi_B"], ttl_seconds=60)
    assert exp - time.time() == pytest.approx(60, abs=2)
    grant = tokens.verify(SECRET, token)
    assert grant.allows("txn_A", None, None)
    assert grant.allows("txn_X", "pi_B", None)
    assert not grant.allows("txn_X", "pi_X", "cus_1")


def test_customer_token_opens_that_customers_transactions_only() -> None:
    grant = tokens.verify(SECRET, tokens.mint(SECRET, cus="cus_1")[0])
    assert grant.allows("txn_any", None, "cus_1")
    assert not grant.allows("txn_any", None, "cus_2")
    assert not grant.allows("txn_any", None, None)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (jwt.encode({"exp": int(time.time()) - 5, "txn": ["t"]}, SECRET, "HS256"), "expired"),
        (jwt.encode({"exp": int(time.time()) + 3600, "txn": ["t"]}, "other-secret-other-secret-123456", "HS256"), "not valid"),
        (jwt.encode({"txn": ["t"]}, SECRET, "HS256"), "no exp claim"),
        (jwt.encode({"exp": int(time.time()) + 3600}, SECRET, "HS256"), "grants no"),
        (jwt.encode({"exp": int(time.time()) + 3600, "txn": [1]}, SECRET, "HS256"), "list of ids"),
        ("not.a.token", "not valid"),
    ],
)
def test_refused_tokens(token: str, message: str) -> None:
    with pytest.raises(tokens.TokenError, match=message):
        tokens.verify(SECRET, token)


def test_alg_none_is_refused() -> None:
    forged = jwt.encode({"exp": int(time.time()) + 3600, "txn": ["t"]}, None, algorithm="none")
    with pytest.raises(tokens.TokenError):
        tokens.verify(SECRET, forged)


def test_a_token_living_longer_than_the_maximum_is_refused() -> None:
    far = jwt.encode({"exp": int(time.time()) + 7200, "txn": ["t"]}, SECRET, "HS256")
    with pytest.raises(tokens.TokenError, match="MAX_TOKEN_TTL"):
        tokens.verify(SECRET, far, max_ttl=3600)
    assert tokens.verify(SECRET, far).txn == frozenset({"t"})  # no maximum: accepted
