"""The registry as the one writer: staging a trained version, and moves that fail half-way."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from captchaops import mlflow_scope
from captchaops.decisions import promotion
from captchaops.decisions.gate import stage_candidate
from captchaops.registry.aliases import named_version, resolve_alias
from captchaops.registry.audit import AUDIT_EXPERIMENT, history
from captchaops.registry.errors import RegistryError
from captchaops.registry.lock import LOCK_STALE_S, lock_run, promotion_lock
from tests.fixtures.models import TrainedModel, make_settings
from tests.fixtures.stack import Tracking
from tests.integration.test_gate import copy_version, isolated, production
from tests.integration.test_registry import audit_runs

pytestmark = pytest.mark.slow


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class FailingFinish:
    """A real client whose audit runs cannot be finished: the write after the alias move fails."""

    def __init__(self, real: MlflowClient) -> None:
        self.real = real
        self.failed: list[str] = []

    def update_run(self, run_id: str, status: str | None = None, name: str | None = None) -> None:
        if status == "FINISHED" and self.real.get_run(run_id).data.tags.get("kind") == "promotion":
            self.failed.append(run_id)
            raise MlflowException("audit store unavailable (injected)")
        self.real.update_run(run_id, status=status, name=name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_stage_candidate_stages_or_rejects_as_training_did(
    tracking_server: Tracking, tmp_path: Path, tiny_model: TrainedModel
) -> None:
    settings = isolated(tracking_server, tmp_path)
    name, client = settings.model_name, mlflow_scope.client(settings)
    first, second, low = (copy_version(settings, tiny_model) for _ in range(3))

    half = settings.model_copy(update={"staging_floor": 0.5})  # the gate decides, registry writes
    assert stage_candidate(client, half, first, 0.91234) is None
    assert stage_candidate(client, half, second, 0.5) is None
    reason = stage_candidate(client, half, low, 0.1, actor="ci")

    assert reason == "test sequence accuracy 0.1000 is below the staging floor 0.5"
    assert resolve_alias(settings, "staging") == second
    tags = {v: client.get_model_version(name, v).tags for v in (first, second, low)}
    assert tags[first]["test_seq_acc"] == "0.9123" and tags[second]["test_seq_acc"] == "0.5000"
    assert tags[first]["validation_status"] == tags[second]["validation_status"] == "pending"
    assert tags[low]["validation_status"] == "rejected"
    assert tags[low]["rejection_reason"] == reason and tags[low]["test_seq_acc"] == "0.1000"
    staged = history(settings, "staging")
    assert [(m.from_version, m.to_version, m.decision) for m in staged] == [
        (None, first, "staged"),
        (first, second, "staged"),
        (second, low, "rejected"),
    ]
    assert staged[-1].actor == "ci" and staged[-1].reason == reason
    assert production(settings) is None and history(settings) == []


def test_a_failed_audit_write_leaves_the_alias_and_rollback_working(
    tracking_server: Tracking, tmp_path: Path, tiny_model: TrainedModel
) -> None:
    settings = isolated(tracking_server, tmp_path)
    name = settings.model_name
    first, second, third = (copy_version(settings, tiny_model) for _ in range(3))
    promotion.promote(settings, version=first, reason="first", actor="ops")
    promotion.promote(settings, version=second, reason="second", actor="ops")
    failing = FailingFinish(mlflow_scope.client(settings))

    with pytest.raises(MlflowException, match="injected"):
        promotion.to_production(
            failing,  # type: ignore[arg-type]
            name,
            third,
            expect_from=second,
            reason="third",
            actor="ops",
            kind="manual",
            candidate=None,
            champion=None,
            thresholds={},
        )

    assert len(failing.failed) == 1
    assert production(settings) == second
    client = mlflow_scope.client(settings)
    assert client.get_run(failing.failed[0]).info.status == "FAILED"
    assert "promoted_at" not in client.get_model_version(name, third).tags
    assert [m.to_version for m in history(settings)] == [first, second]
    move = promotion.rollback(settings, reason="after the failed move", actor="ops")
    assert (move.from_version, move.to_version) == (second, first)
    assert production(settings) == first


def test_a_failed_audit_write_of_a_first_move_removes_the_alias(
    tracking_server: Tracking, tmp_path: Path, tiny_model: TrainedModel
) -> None:
    settings = isolated(tracking_server, tmp_path)
    version = copy_version(settings, tiny_model)
    failing = FailingFinish(mlflow_scope.client(settings))

    with pytest.raises(MlflowException, match="injected"):
        stage_candidate(failing, settings, version, 1.0)  # type: ignore[arg-type]

    assert resolve_alias(settings, "staging") is None
    assert history(settings, "staging") == []
    assert [r.info.status for r in audit_runs(settings)] == ["FAILED"]
    with pytest.raises(RegistryError, match=r"no version of .* has alias @staging"):
        named_version(settings, alias="staging")


def test_movers_racing_to_make_the_lock_all_use_one_run(
    tracking_server: Tracking, tmp_path: Path
) -> None:
    settings = make_settings(tracking_server, tmp_path, model_name=unique("lock"))
    client = mlflow_scope.client(settings)
    start = threading.Barrier(6)
    found: list[str] = []

    def make() -> None:
        start.wait()
        found.append(lock_run(client, settings.model_name, "racer"))

    threads = [threading.Thread(target=make) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert len(found) == 6 and len(set(found)) == 1
    experiment = client.get_experiment_by_name(AUDIT_EXPERIMENT)
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.lock_of = '{settings.model_name}'", max_results=100
    )
    assert [r.info.run_id for r in runs if "sealed" in r.data.params] == found[:1]
    assert all("abandoned" in r.data.tags for r in runs if r.info.run_id != found[0])


def test_a_crashed_holder_is_taken_over_and_a_live_one_is_not(
    tracking_server: Tracking, tmp_path: Path
) -> None:
    settings = make_settings(tracking_server, tmp_path, model_name=unique("lock"))
    client, name = mlflow_scope.client(settings), settings.model_name
    run_id = lock_run(client, name, "setup")
    client.log_param(run_id, "hold_1", f"dead|{time.time() - LOCK_STALE_S - 60:.0f}|crashed")
    with promotion_lock(client, name, "next", timeout_s=1):
        params = client.get_run(run_id).data.params
        assert params["hold_2"].endswith("|next") and "free_1" not in params
        third = promotion_lock(client, name, "third", timeout_s=1)
        with pytest.raises(RegistryError, match=r"holds the lock \(by next"), third:
            pass
    assert client.get_run(run_id).data.params["free_2"] == params["hold_2"]
