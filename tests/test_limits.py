"""Per-token stream limits count the token, not its spelling (issue 14)."""

from __future__ import annotations

import time

import pytest

from paystream.auth import tokens
from paystream.auth.limits import StreamLimits
from paystream.auth.tokens import BACKEND
from paystream.errors import ApiError

SECRET = "s" * 32


def test_every_spelling_that_verifies_has_one_key() -> None:
    token, exp = tokens.mint(SECRET, txn=["txn_A"], ttl_seconds=60)
    grant = tokens.verify(SECRET, token)
    assert grant.exp == exp and len(grant.key) == 32
    assert tokens.verify(SECRET, token + "=").key == grant.key
    other = tokens.verify(SECRET, tokens.mint(SECRET, txn=["txn_B"], ttl_seconds=60)[0])
    assert other.key != grant.key


def test_expiry_follows_exp() -> None:
    grant = tokens.verify(SECRET, tokens.mint(SECRET, cus="cus_1", ttl_seconds=60)[0])
    assert not grant.expired()
    assert grant.expired(now=grant.exp)
    assert not BACKEND.expired() and BACKEND.exp is None


def test_a_token_is_counted_whatever_its_spelling() -> None:
    token = tokens.mint(SECRET, txn=["txn_A"])[0]
    limits = StreamLimits(per_token=2, per_address=10)
    first = limits.acquire(tokens.verify(SECRET, token), "1.1.1.1")
    limits.acquire(tokens.verify(SECRET, token + "="), "1.1.1.1")
    with pytest.raises(ApiError) as refused:
        limits.acquire(tokens.verify(SECRET, token), "2.2.2.2")
    assert (refused.value.status, refused.value.code) == (429, "too_many_streams")
    first()
    first.release()  # a second release gives nothing back twice
    limits.acquire(tokens.verify(SECRET, token), "1.1.1.1")
    with pytest.raises(ApiError):
        limits.acquire(tokens.verify(SECRET, token), "1.1.1.1")


def test_a_renewed_socket_moves_to_its_new_token() -> None:
    old = tokens.verify(SECRET, tokens.mint(SECRET, txn=["txn_A"], ttl_seconds=5)[0])
    new = tokens.verify(SECRET, tokens.mint(SECRET, txn=["txn_A"], ttl_seconds=3600)[0])
    limits = StreamLimits(per_token=1, per_address=10)
    lease = limits.acquire(old, "1.1.1.1")
    lease.move_to(new)
    limits.acquire(old, "1.1.1.1")  # the old token's slot is free again
    with pytest.raises(ApiError):
        limits.acquire(new, "1.1.1.1")
    blocked = limits.acquire(tokens.verify(SECRET, tokens.mint(SECRET, cus="c")[0]), "1.1.1.1")
    with pytest.raises(ApiError):
        blocked.move_to(new)  # full: nothing changes
    lease.release()
    blocked.move_to(new)
    assert limits._tokens[new.key] == 1 and limits._addresses["1.1.1.1"] == 2


def test_the_api_key_is_not_counted() -> None:
    limits = StreamLimits(per_token=1, per_address=1)
    for _ in range(3):
        limits.acquire(BACKEND, "1.1.1.1")
    assert not limits._tokens and not limits._addresses


def test_time_is_what_the_token_says() -> None:
    token = tokens.mint(SECRET, txn=["t"], ttl_seconds=-5)[0]
    with pytest.raises(tokens.TokenError, match="expired"):
        tokens.verify(SECRET, token)
    assert tokens.verify(SECRET, tokens.mint(SECRET, txn=["t"])[0]).exp > time.time()
