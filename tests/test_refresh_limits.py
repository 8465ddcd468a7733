"""The refresh endpoint's bounds, on a clock the test controls."""

from __future__ import annotations

import pytest

from paystream.errors import ApiError
from paystream.payments import refresh


def test_two_reads_of_a_transaction_then_one_per_two_seconds_and_a_rate_in_all(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(refresh.time, "monotonic", lambda: now[0])
    limits = refresh.RefreshLimits(rate=3)
    for txn in ("a", "b", "c"):
        limits.take(txn)
    with pytest.raises(ApiError) as caught:
        limits.take("d")  # the bucket is empty: 3 a second in all
    assert caught.value.status == 429 and caught.value.headers == {"Retry-After": "1"}
    now[0] += 0.5
    limits.take("a")  # the second read in a row (Pay's, then 3-D Secure's): let through
    now[0] += 0.5
    with pytest.raises(ApiError, match="moments ago"):
        limits.take("a")  # the third waits for REFRESH_EVERY
    limits.take("d")  # a second refilled 3 reads, 1 taken
    now[0] += 2.0
    limits.take("a")  # past two seconds, and the bucket refilled


def test_a_token_and_an_address_are_refused_by_their_own_share_which_costs_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(refresh.time, "monotonic", lambda: now[0])
    limits = refresh.RefreshLimits(rate=20)  # a token: 4 then 1/s; an address: 10 then 5/s
    for i in range(4):
        limits.take(f"t{i}", b"A", "10.0.0.1")
    with pytest.raises(ApiError, match="token"):
        limits.take("t4", b"A", "10.0.0.1")
    for i in range(6):  # the refusal took nothing from the address: 6 of its 10 are left
        limits.take(f"u{i}", b"B%d" % i, "10.0.0.1")
    with pytest.raises(ApiError, match="address"):
        limits.take("u6", b"C", "10.0.0.1")
    limits.take("v", b"C", "10.0.0.2")  # another address: 10 of the process's 20 are left
