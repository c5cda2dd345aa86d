"""The promotion lock reads the tracking server's clock: a holder whose own clock is a day
ahead still stamps its hold with the server's time, so a crashed hold goes stale on time."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from captchaops import mlflow_scope
from captchaops.registry import lock
from captchaops.registry.lock import promotion_lock
from tests.fixtures.stack import Tracking
from tests.integration.test_gate import isolated

pytestmark = pytest.mark.slow
DAY = 86_400.0


def test_the_server_clock_is_read_from_its_answers(
    tracking_server: Tracking, tmp_path: Path
) -> None:
    client = mlflow_scope.client(isolated(tracking_server, tmp_path))
    assert abs(lock.server_time(client) - time.time()) < 5


def test_a_hold_is_stamped_and_judged_by_the_server_clock(
    tracking_server: Tracking, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = isolated(tracking_server, tmp_path)
    client = mlflow_scope.client(settings)
    real = time.time
    monkeypatch.setattr(lock.time, "time", lambda: real() + DAY)  # this machine runs a day ahead
    with promotion_lock(client, settings.model_name, "skewed holder"):
        run_id = lock.lock_run(client, settings.model_name, "reader")
        stamp = float(client.get_run(run_id).data.params["hold_1"].split("|")[1])
    monkeypatch.undo()
    assert abs(stamp - real()) < 60, "the hold carries this machine's clock, not the server's"
    # A crashed holder (never released) goes stale after LOCK_STALE_S of the server's time.
    client.log_param(run_id, "hold_2", f"crashed|{real() - lock.LOCK_STALE_S - 5:.0f}|gone")
    with promotion_lock(client, settings.model_name, "next", timeout_s=5):
        pass
