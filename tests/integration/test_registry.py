"""Promotion, rollback, audit trail, bad input and concurrent promotions on a real tracking server."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import mlflow
import pytest

from captchaops import mlflow_scope
from captchaops.decisions import gate, promotion, scores
from captchaops.evaluation import evalset
from captchaops.mlflow_scope import pointed_at
from captchaops.registry.audit import AUDIT_EXPERIMENT
from captchaops.registry.errors import RegistryError
from captchaops.registry.listing import list_versions
from captchaops.registry.lock import promotion_lock
from captchaops.settings import Settings
from tests.fixtures.models import TrainedModel
from tests.fixtures.stack import Tracking
from tests.integration.test_gate import (
    _cli,
    copy_version,
    damaged_version,
    isolated,
    production,
    stage,
)

pytestmark = pytest.mark.slow


def audit_runs(settings: Settings) -> list[mlflow.entities.Run]:
    """Every audit record of this test's model, oldest first."""
    client = mlflow_scope.client(settings)
    experiment = client.get_experiment_by_name(AUDIT_EXPERIMENT)
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.model_name = '{settings.model_name}'"
    )
    return sorted(runs, key=lambda r: r.info.start_time)


def stages(settings: Settings) -> dict[str, str]:
    client = mlflow_scope.client(settings)
    return {
        str(mv.version): mv.current_stage
        for mv in client.search_model_versions(f"name='{settings.model_name}'")
    }


def test_rollback_restores_the_previous_production_version(
    tracking_server: Tracking, tmp_path: Path, tiny_model: TrainedModel
) -> None:
    settings = isolated(tracking_server, tmp_path)
    first = copy_version(settings, tiny_model)
    promotion.promote(settings, version=first, reason="first release", actor="alice")
    second = damaged_version(settings, tiny_model, "junk")
    promotion.promote(settings, version=second, reason="try the new one", actor="bob")
    assert production(settings) == second

    move = promotion.rollback(settings, reason="users complain", actor="carol")

    assert (move.from_version, move.to_version, move.kind) == (second, first, "rollback")
    assert production(settings) == first
    assert stages(settings)[first] == "Production" and stages(settings)[second] != "Production"
    with pointed_at(settings):
        loaded = mlflow.pyfunc.load_model(f"models:/{settings.model_name}/Production")
    assert loaded.metadata.run_id == tiny_model.run_id
    client = mlflow_scope.client(settings)
    tags = client.get_model_version(settings.model_name, second).tags
    assert tags["validation_status"] == "rejected" and "users complain" in tags["rejection_reason"]

    records = audit_runs(settings)
    assert [r.data.tags["decision"] for r in records] == ["promoted", "promoted", "rolled-back"]
    assert [(r.data.params["from_version"], r.data.params["to_version"]) for r in records] == [
        ("", first),
        (first, second),
        (second, first),
    ]
    assert [r.data.params["actor"] for r in records] == ["alice", "bob", "carol"]
    for record in records[1:]:
        assert {"candidate_seq_acc", "candidate_cer", "champion_seq_acc", "champion_cer"} <= set(
            record.data.metrics
        )
        assert record.data.params["evalset_digest"] == evalset.current_digest(
            mlflow_scope.client(settings), settings
        )
    assert records[2].data.metrics["candidate_cer"] < records[2].data.metrics["champion_cer"]

    with pytest.raises(RegistryError, match="nothing earlier to roll back to"):
        promotion.rollback(settings, actor="carol")
    assert production(settings) == first and len(audit_runs(settings)) == 3


def test_rollback_to_an_earlier_version(
    tracking_server: Tracking, tmp_path: Path, tiny_model: TrainedModel
) -> None:
    settings = isolated(tracking_server, tmp_path)
    versions = [copy_version(settings, tiny_model) for _ in range(3)]
    for version in versions:
        promotion.promote(settings, version=version, reason=f"release {version}", actor="ops")

    with pytest.raises(RegistryError, match="has no version 99"):
        promotion.rollback(settings, to="99")
    promotion.rollback(settings, to=versions[0], actor="ops")

    assert production(settings) == versions[0]
    with pytest.raises(RegistryError, match="was never @production before"):
        promotion.rollback(settings, to=versions[1], actor="ops")


def test_bad_input_is_one_line_and_changes_nothing(
    tracking_server: Tracking, tmp_path: Path, tiny_model: TrainedModel
) -> None:
    settings = isolated(tracking_server, tmp_path)
    version = copy_version(settings, tiny_model)

    def unchanged() -> tuple[str | None, int]:
        return production(settings), len(audit_runs(settings))

    before = unchanged()
    cases = [
        (lambda: promotion.promote(settings, version="42", reason="x"), "has no version 42"),
        (lambda: promotion.promote(settings, from_alias="staging", reason="x"), "@staging"),
        (lambda: promotion.rollback(settings), "no audited production history"),
        (lambda: gate.auto_promote(settings), "@staging"),
    ]
    for call, message in cases:
        with pytest.raises(RegistryError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
        assert unchanged() == before

    client = mlflow_scope.client(settings)
    client.set_model_version_tag(settings.model_name, version, "validation_status", "rejected")
    client.set_model_version_tag(settings.model_name, version, "rejection_reason", "too slow")
    with pytest.raises(RegistryError, match=r"was rejected \(too slow\); pass --force"):
        promotion.promote(settings, version=version, reason="x")
    assert unchanged() == before
    promotion.promote(settings, version=version, reason="we accept it", force=True, actor="dana")
    assert production(settings) == version

    other = settings.model_copy(update={"model_name": "no-such-model"})
    with pytest.raises(RegistryError, match="no registered model 'no-such-model'"):
        list_versions(other)

    failed = _cli(settings, "rollback")
    assert failed.returncode == 1 and failed.stderr.count("\n") == 1
    assert "nothing earlier to roll back to" in failed.stderr


def test_models_listing_shows_aliases_status_and_last_move(
    tracking_server: Tracking, tmp_path: Path, tiny_model: TrainedModel
) -> None:
    settings = isolated(tracking_server, tmp_path)
    champion = copy_version(settings, tiny_model)
    stage(settings, champion)
    gate.auto_promote(settings, actor="gatekeeper", reason="nightly")

    listing = list_versions(settings)

    (row,) = listing.rows
    assert row.aliases == ["production", "staging"] and row.status == "validated"
    assert row.stage == "Production" and row.eval_cer is not None
    assert "gatekeeper" in listing.last_moves["production"]
    shown = _cli(settings, "models")
    assert shown.returncode == 0 and "gatekeeper" in shown.stdout


def assert_consistent(settings: Settings) -> list[mlflow.entities.Run]:
    """The alias, the Production stage and the chain of audited moves all agree."""
    moves = [r for r in audit_runs(settings) if r.data.tags["decision"] == "promoted"]
    moves.sort(key=lambda r: int(r.data.params["seq"]))
    previous = ""
    for record in moves:
        assert record.data.params["from_version"] == previous
        previous = record.data.params["to_version"]
    assert production(settings) == previous
    in_production = [v for v, s in stages(settings).items() if s == "Production"]
    assert in_production == [previous]
    return moves


def test_concurrent_promotions_leave_a_consistent_registry(
    tracking_server: Tracking, tmp_path: Path, tiny_model: TrainedModel
) -> None:
    settings = isolated(tracking_server, tmp_path)
    versions = [copy_version(settings, tiny_model) for _ in range(4)]
    start = threading.Barrier(len(versions))
    outcomes: dict[str, str] = {}

    def promote(version: str) -> None:
        start.wait()
        try:
            promotion.promote(settings, version=version, reason="race", actor=f"t{version}")
            outcomes[version] = "promoted"
        except RegistryError as exc:
            outcomes[version] = str(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    promoted = [v for v, outcome in outcomes.items() if outcome == "promoted"]
    refused = [o for o in outcomes.values() if o != "promoted"]
    assert promoted and len(outcomes) == len(versions)
    assert all("while this ran; run the command again" in o for o in refused), refused
    assert len(assert_consistent(settings)) == len(promoted)


def test_concurrent_cli_processes_leave_a_consistent_registry(
    tracking_server: Tracking, tmp_path: Path, tiny_model: TrainedModel
) -> None:
    settings = isolated(tracking_server, tmp_path)
    first, second = copy_version(settings, tiny_model), copy_version(settings, tiny_model)
    for version in (first, second):
        scores.cached_score(
            mlflow_scope.client(settings),
            settings,
            version,
            evalset.ensure_evalset(mlflow_scope.client(settings), settings),
        )

    results: list[subprocess.CompletedProcess[str]] = []

    def run(version: str) -> None:
        results.append(_cli(settings, "promote", "--version", version, "--reason", "race"))

    procs = [threading.Thread(target=run, args=(v,)) for v in (first, second)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)

    codes = sorted(r.returncode for r in results)
    assert codes in ([0, 0], [0, 1]), [r.stderr for r in results]
    for failed in (r for r in results if r.returncode):
        assert "while this ran" in failed.stderr and failed.stderr.count("\n") == 1
    assert len(assert_consistent(settings)) == codes.count(0)


def test_lock_is_exclusive_and_released(tracking_server: Tracking, tmp_path: Path) -> None:
    settings = isolated(tracking_server, tmp_path)
    client = mlflow_scope.client(settings)
    held = promotion_lock(client, settings.model_name, "holder")
    other = promotion_lock(client, settings.model_name, "other", timeout_s=1)
    with held, pytest.raises(RegistryError, match="holds the lock"), other:
        pass
    with promotion_lock(client, settings.model_name, "other", timeout_s=1):
        pass
