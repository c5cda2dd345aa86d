"""The correction limiter: per client a minute and a day, from everyone a day (a settable clock)."""

from __future__ import annotations

import pytest

from captchaops.webapp.limits import DAY, Limiter, Throttled


class Clock:
    """Seconds since the epoch that the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def admitted(limiter: Limiter, client: str, attempts: int) -> int:
    """How many of `attempts` the limiter lets through."""
    count = 0
    for _ in range(attempts):
        try:
            limiter.admit(client)
        except Throttled:
            continue
        count += 1
    return count


def test_a_client_gets_its_rate_per_minute_and_others_are_not_affected() -> None:
    clock = Clock(100 * DAY + 10)
    limiter = Limiter(per_minute=5, per_day=100, total_per_day=1000, clock=clock)
    assert admitted(limiter, "a", 200) == 5
    with pytest.raises(Throttled) as refused:
        limiter.admit("a")
    assert refused.value.status == 429 and refused.value.error == "rate_limited"
    assert refused.value.retry_after == 60 and "at most 5 a minute" in refused.value.detail
    assert admitted(limiter, "b", 1) == 1
    clock.now += 30
    with pytest.raises(Throttled) as later:
        limiter.admit("a")
    assert later.value.retry_after == 30
    clock.now += 30
    assert admitted(limiter, "a", 10) == 5


def test_refused_attempts_do_not_count() -> None:
    clock = Clock(100 * DAY)
    limiter = Limiter(per_minute=2, per_day=100, total_per_day=1000, clock=clock)
    admitted(limiter, "a", 50)
    clock.now += 60
    assert admitted(limiter, "a", 2) == 2


def test_daily_quota_per_client_and_for_everyone_until_utc_midnight() -> None:
    clock = Clock(100 * DAY + DAY - 3600)
    limiter = Limiter(per_minute=1000, per_day=3, total_per_day=5, clock=clock)
    assert admitted(limiter, "a", 10) == 3
    with pytest.raises(Throttled) as client_quota:
        limiter.admit("a")
    assert client_quota.value.error == "daily_quota" and client_quota.value.retry_after == 3600
    assert admitted(limiter, "b", 10) == 2
    with pytest.raises(Throttled) as everyone:
        limiter.admit("c")
    assert "from all visitors" in everyone.value.detail
    clock.now += 3600
    assert admitted(limiter, "a", 10) == 3
    assert admitted(limiter, "c", 10) == 2
