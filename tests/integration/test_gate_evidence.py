"""`promote --auto` with live evidence: monitoring runs in a real tracking server (as the model
servers leave them, see test_monitoring.py) decide alongside the frozen set, and the decision
line and the audit record name the evidence used.

The candidates are twins of the champion, so the frozen set lets each through (margin 0) and
none wins on it: only the live evidence can refuse them.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from captchaops import mlflow_scope
from captchaops.decisions import gate
from captchaops.live import monitoring
from captchaops.registry.audit import moves
from captchaops.settings import Settings
from tests.fixtures.models import TrainedModel
from tests.fixtures.stack import Tracking
from tests.integration.test_gate import _cli, copy_version, isolated, production, stage

pytestmark = pytest.mark.slow


def monitored(
    settings: Settings,
    alias: str,
    version: str,
    metrics: dict[str, float],
    tags: dict[str, str] | None = None,
    at: float | None = None,
) -> None:
    """Log points to the monitoring run of (model, alias, version) on one replica, creating it
    once."""
    client = MlflowClient(settings.effective_tracking_uri, settings.effective_tracking_uri)
    name = monitoring.experiment_name(settings.model_name)
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    found = client.search_runs(
        [experiment_id], monitoring.key_filter(settings.model_name, alias, version, "r1")
    )
    if found:
        run_id = found[0].info.run_id
    else:
        tags = {
            monitoring.KEY_TAG: monitoring.run_key(settings.model_name, alias, version, "r1"),
            monitoring.ALIAS_KEY_TAG: monitoring.alias_key(settings.model_name, alias, version),
        }
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
    stamp = int((at or time.time()) * 1000)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value, timestamp=stamp, step=0)
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)


def test_live_evidence_refuses_a_twin_that_trails_and_promotes_one_that_keeps_up(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path: Path
) -> None:
    settings = isolated(tracking_server, tmp_path)
    first = copy_version(settings, tiny_model)
    stage(settings, first)
    decision, move = gate.auto_promote(settings, actor="pytest")
    assert decision.promote and move is not None
    assert move.reason.endswith("; no live evidence")

    # A twin whose estimate trails production's by 10 points and that agrees on half the copies.
    trailing = copy_version(settings, tiny_model)
    stage(settings, trailing)
    now = time.time()
    monitored(settings, "production", first, {monitoring.LIVE_ESTIMATE: 0.5}, at=now - 3600)
    monitored(
        settings,
        "production",
        first,
        {
            monitoring.LIVE_ESTIMATE: 0.9,
            monitoring.SHADOW_COMPARISONS: 300,
            monitoring.SHADOW_AGREEMENT: 0.5,
        },
        {monitoring.SHADOW_TAG: trailing},
        at=now - 30,
    )
    monitored(
        settings,
        "staging",
        trailing,
        {monitoring.LIVE_ESTIMATE: 0.8, monitoring.LIVE_ANSWERS: 200},
        at=now,
    )
    decision, move = gate.auto_promote(settings, actor="pytest")
    assert not decision.promote and move is not None
    assert production(settings) == first
    assert [r.split(" ", 2)[:2] for r in decision.refusals] == [
        ["live", "estimate"],
        ["shadow", "agreement"],
    ]
    assert "10.0 points below production's 90.0% over the same period" in move.reason
    assert move.reason.endswith(
        "live evidence: live estimate 80.0% over 200 answers vs production's 90.0% over the "
        "same period, shadow agreement 50.0% over 300 comparisons"
    )
    (audited,) = [
        m
        for m in moves(mlflow_scope.client(settings), settings.model_name, "production")
        if m.to_version == trailing
    ]
    assert audited.decision == "rejected" and "shadow agreement 50.0%" in audited.reason

    # A twin that keeps up: the same command users run promotes it and names the evidence.
    keeping = copy_version(settings, tiny_model)
    stage(settings, keeping)
    monitored(
        settings,
        "production",
        first,
        {monitoring.SHADOW_COMPARISONS: 250, monitoring.SHADOW_AGREEMENT: 0.96},
        {monitoring.SHADOW_TAG: keeping},
    )
    monitored(
        settings, "staging", keeping, {monitoring.LIVE_ESTIMATE: 0.88, monitoring.LIVE_ANSWERS: 220}
    )
    done = _cli(settings, "promote", "--auto")
    assert done.returncode == gate.EXIT_PROMOTED, done.stdout + done.stderr
    line = " ".join(done.stdout.split())
    assert f"promoted v{keeping}" in line
    assert (
        "live evidence: live estimate 88.0% over 220 answers vs production's 90.0% over the "
        "same period, shadow agreement 96.0% over 250 comparisons"
    ) in line
    assert production(settings) == keeping

    # A candidate a canary served from the production server: that run is its evidence.
    canary = copy_version(settings, tiny_model)
    stage(settings, canary)
    monitored(settings, "production", keeping, {monitoring.LIVE_ESTIMATE: 0.9})
    monitored(
        settings,
        "production",
        canary,
        {monitoring.LIVE_ESTIMATE: 0.7, monitoring.LIVE_ANSWERS: 150},
    )
    decision, _ = gate.auto_promote(settings, actor="pytest")
    assert not decision.promote
    assert "live estimate 70.0% over 150 answers vs production's 90.0%" in decision.reason()
