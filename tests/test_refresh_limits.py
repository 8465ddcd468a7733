"""The refresh endpoint's bounds, on a clock the test controls."""

from __future__ import annotations

import pytest

from paystream.errors import ApiError
from paystream.payments import refresh


def test_one_read_per_transaction_per_two_seconds_and_a_rate_in_all(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(refresh.time, "monotonic", lambda: now[0])
    limits = refresh.RefreshLimits(rate=3)
    for txn in ("a", "b", "c"):
        limits.take(txn)
    with pytest.raises(ApiError) as caught:
        limits.take("d")  # the bucket is empty: 3 a second in all
    assert caught.value.status == 429 and caught.value.headers == {"Retry-After": "1"}
    now[0] += 0.5
    with pytest.raises(ApiError, match="moments ago"):
        limits.take("a")
    limits.take("d")  # half a second refilled 1.5 reads
    now[0] += 2.0
    limits.take("a")  # past two seconds, and the bucket refilled
