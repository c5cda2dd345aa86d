"""`captchaops demo` from a fresh home: the whole pipeline, a re-run that reuses it, then `down`.

The first run calls `run_demo` with the demo preset swapped for the tiny test config (the demo
preset takes minutes; benchmarks/bench_e2e.py times it); the staging floor is 0 so the tiny model is staged and the
gate promotes it as the first candidate. The re-run is the real `captchaops demo` command.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from captchaops import mlflow_scope
from captchaops.demo import run_demo
from captchaops.registry.aliases import resolve_alias
from captchaops.registry.names import PRODUCTION
from captchaops.settings import load_settings
from captchaops.training.config import TrainConfig
from harness.load import captcha_body
from harness.mlflow_state import mlflow_state_restored
from harness.stack import PrivateStack
from harness.training import tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture()
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PrivateStack]:
    """A private home and free ports for every service, in this process's environment too
    (supervisord and the services inherit it, as from `captchaops demo`); stopped afterwards."""
    private = PrivateStack.create(tmp_path / "home", CAPTCHAOPS_STAGING_FLOOR="0")
    for key, value in private.env.items():
        if key.startswith("CAPTCHAOPS_"):
            monkeypatch.setenv(key, value)
    try:
        with mlflow_state_restored():
            yield private
    finally:
        private.down()


def test_demo_trains_promotes_serves_then_reuses_and_down_leaves_nothing(
    stack: PrivateStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings()
    said: list[str] = []
    started = time.monotonic()
    monkeypatch.setattr(TrainConfig, "demo", classmethod(lambda cls: tiny_config()))
    summary = run_demo(settings, say=said.append)
    print(f"tiny demo from a fresh home: {time.monotonic() - started:.0f}s")

    assert summary.trained_version is not None, said
    assert summary.decision.startswith("promoted"), summary.decision
    assert summary.production_version == summary.trained_version
    assert not any(line.startswith("warning") for line in said), "\n".join(said)
    assert len(summary.lines) == 6
    assert re.match(r"training        : \d+ of 16 planned steps, ", summary.lines[2])
    assert "images/s" in summary.lines[2] and "first step after" in summary.lines[2]
    assert summary.urls == {
        "MLflow UI": stack.url("tracking"),
        "web app": stack.url("app"),
        "production endpoint": f"{stack.url('production')}/invocations",
        "staging endpoint": f"{stack.url('staging')}/invocations",
    }
    answer = httpx.post(summary.urls["production endpoint"], json=captcha_body(), timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Model-Version"] == summary.trained_version
    assert httpx.get(summary.urls["MLflow UI"], timeout=10).status_code == 200
    assert httpx.get(summary.urls["web app"], timeout=10).status_code == 200
    client = mlflow_scope.client(settings)
    runs_before = client.search_runs(
        [client.get_experiment_by_name(settings.experiment_name).experiment_id]
    )

    again = stack.cli("demo")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already running" in again.stdout
    assert f"reusing v{summary.trained_version} @production" in again.stdout
    for url in summary.urls.values():
        assert url in again.stdout, again.stdout
    assert "trained version : none (reused)" in again.stdout
    assert f"production v{summary.trained_version}" in again.stdout
    assert len(client.search_model_versions(f"name='{settings.model_name}'")) == 1
    assert len(
        client.search_runs([client.get_experiment_by_name(settings.experiment_name).experiment_id])
    ) == len(runs_before)
    assert resolve_alias(settings, PRODUCTION) == summary.trained_version

    down = stack.cli("down")
    assert down.returncode == 0 and "stack stopped" in down.stdout, down.stdout + down.stderr
    assert stack.leftovers() == []
    for url in summary.urls.values():
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, timeout=2)
