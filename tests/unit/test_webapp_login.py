"""The login gate's memory: a good login is checked once per cache period, failures are
counted per client and account and forgotten after a minute (the tracking server's side is in
tests/integration/test_webapp_login.py)."""

from __future__ import annotations

import pytest

from captchaops.settings import Settings
from captchaops.webapp.accounts import MAX_FIELD, Gate
from captchaops.webapp.limits import Throttled


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gate(clock: Clock, calls: list[tuple[str, str]], **values: object) -> Gate:
    """A gate whose tracking server knows one account, ed / right-password."""
    fields: dict[str, object] = {
        "app_login_cache_seconds": 60,
        "app_login_failures_per_minute": 2,
    } | values
    settings = Settings(**fields)  # type: ignore[arg-type]

    def check(user: str, password: str) -> bool:
        calls.append((user, password))
        return (user, password) == ("ed", "right-password")

    return Gate(settings, check, clock)


def test_a_good_login_is_asked_once_per_cache_period() -> None:
    clock, calls = Clock(), []
    g = gate(clock, calls)
    assert g.admit("10.0.0.1", "ed", "right-password")
    clock.now += 59
    assert g.admit("10.0.0.2", "ed", "right-password")
    assert len(calls) == 1
    clock.now += 2
    assert g.admit("10.0.0.1", "ed", "right-password")
    assert len(calls) == 2
    assert not g.admit("10.0.0.1", "ed", "wrong")
    assert not g.admit("10.0.0.1", "ed", "wrong")
    assert len(calls) == 4, "a bad login is never remembered as good or bad"


def test_no_cache_when_the_period_is_zero() -> None:
    clock, calls = Clock(), []
    g = gate(clock, calls, app_login_cache_seconds=0)
    assert g.admit("c", "ed", "right-password") and g.admit("c", "ed", "right-password")
    assert len(calls) == 2


def test_failures_are_limited_per_client_and_account_for_a_minute() -> None:
    clock, calls = Clock(), []
    g = gate(clock, calls)
    assert not g.admit("c", "ed", "a") and not g.admit("c", "ed", "b")
    with pytest.raises(Throttled) as over:
        g.admit("c", "ed", "right-password")
    assert over.value.status == 429 and over.value.retry_after == 60
    assert len(calls) == 2, "a throttled attempt never reaches the tracking server"
    assert not g.admit("c", "rita", "x") and not g.admit("other", "ed", "y")
    clock.now += 61
    assert g.admit("c", "ed", "right-password")


def test_oversized_fields_are_refused_without_asking() -> None:
    clock, calls = Clock(), []
    g = gate(clock, calls)
    assert not g.admit("c", "ed", "p" * (MAX_FIELD + 1))
    assert not g.admit("c", "u" * (MAX_FIELD + 1), "p")
    assert calls == []
