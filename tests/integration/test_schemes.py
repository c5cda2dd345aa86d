"""Two schemes (registered models) side by side on one tracking server, and the CLI's --model-name.

Scheme A reads the default synthetic alphabet (the session's tiny model, registered again);
scheme B is a tiny model trained on another alphabet ("ABC", 3 characters). Each keeps its own
aliases, frozen evaluation set, audit trail and promotion lock, and the gate refuses to judge a
candidate of one scheme against the other's champion or frozen set.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from captchaops import mlflow_scope
from captchaops.cli import app
from captchaops.decisions import gate, promotion
from captchaops.evaluation import evalset, scheme
from captchaops.registry.audit import AUDIT_EXPERIMENT, history
from captchaops.registry.lock import promotion_lock
from captchaops.settings import Settings
from tests.fixtures.models import TrainedModel, make_settings
from tests.fixtures.stack import VENV_BIN, Tracking, free_port, start_http_process, stop_process
from tests.integration.test_gate import copy_version, production, stage

pytestmark = pytest.mark.slow
EVAL_SIZE = 60
OTHER_ALPHABET = "ABC"


@dataclass(frozen=True)
class Schemes:
    """Two registered models on one server, each with a frozen set and a @production version."""

    a: Settings
    b: Settings
    version_a: str
    model_b: TrainedModel


def train_other_alphabet(settings: Settings) -> TrainedModel:
    """The tiny preset on 3-character labels over OTHER_ALPHABET, registered under settings."""
    from captchaops.training.run import train
    from harness.training import tiny_config

    config = replace(tiny_config(), alphabet=OTHER_ALPHABET, length=(3, 3))
    result = train(config, settings)
    return TrainedModel(
        settings.model_name, result.version, result.run_id, result.model_uri, result.metrics
    )


def unique(prefix: str) -> str:
    """A model name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def schemes(
    tracking_server: Tracking, tmp_path_factory: pytest.TempPathFactory, tiny_model: TrainedModel
) -> Schemes:
    """Scheme A (default alphabet) and B (OTHER_ALPHABET), each promoted by the gate.

    A's frozen set is made up front; B's by the gate on first use, like its candidate.
    """
    home = tmp_path_factory.mktemp("schemes")
    a = make_settings(tracking_server, home, model_name=unique("scheme-a"))
    b = make_settings(tracking_server, home, model_name=unique("scheme-b"))
    evalset.create_evalset(mlflow_scope.client(a), a, size=EVAL_SIZE)
    version_a = copy_version(a, tiny_model)
    stage(a, version_a)
    model_b = train_other_alphabet(b)
    for settings in (a, b):
        decision, _ = gate.auto_promote(settings, actor="pytest")
        assert decision.promote, decision.refusals
    return Schemes(a, b, version_a, model_b)


@pytest.fixture()
def cli(tracking_server: Tracking, tmp_path: Path, isolated_mlflow: None) -> Iterator[CliRunner]:
    """A CliRunner whose environment points `captchaops` at the test tracking server."""
    yield CliRunner(
        env={
            "CAPTCHAOPS_HOME": str(tmp_path),
            "CAPTCHAOPS_TRACKING_URI": tracking_server.uri,
            "CAPTCHAOPS_STAGING_FLOOR": "0",
            "CAPTCHAOPS_ACTOR": "cli-test",
            "CAPTCHAOPS_MODEL_NAME": None,
        }
    )


def audit_ids(settings: Settings) -> set[str]:
    """Run ids of every audit record of the settings' model."""
    client = mlflow_scope.client(settings)
    experiment = client.get_experiment_by_name(AUDIT_EXPERIMENT)
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.model_name = '{settings.model_name}'"
    )
    return {run.info.run_id for run in runs}


def snapshot(settings: Settings) -> tuple[object, ...]:
    """Everything of a scheme that another scheme's moves must leave alone."""
    model = mlflow_scope.client(settings).get_registered_model(settings.model_name)
    return dict(model.aliases), dict(model.tags), audit_ids(settings)


def test_each_scheme_keeps_its_own_aliases_frozen_set_and_audit(schemes: Schemes) -> None:
    a, b = schemes.a, schemes.b
    assert production(b) == schemes.model_b.version
    digest_a, digest_b = (
        evalset.current_digest(mlflow_scope.client(a), a),
        evalset.current_digest(mlflow_scope.client(b), b),
    )
    assert digest_a and digest_b and digest_a != digest_b
    frozen_b = evalset.load_evalset(mlflow_scope.client(b), digest_b)
    assert {len(label) for label in frozen_b.labels} == {3}
    assert set("".join(frozen_b.labels)) <= set(OTHER_ALPHABET)
    client = mlflow_scope.client(a)
    scheme_b = scheme.scheme_of(client, b.model_name, schemes.model_b.version)
    assert scheme_b == scheme.Scheme(OTHER_ALPHABET, 3, 3, "synthetic")
    versions_b = {str(mv.version) for mv in client.search_model_versions(f"name='{b.model_name}'")}
    assert {m.to_version for m in history(b)} <= versions_b
    assert history(a)[0].to_version == schemes.version_a
    assert all(m.run_id not in audit_ids(a) for m in history(b))


def test_moves_on_one_scheme_leave_the_other_alone(
    schemes: Schemes, tiny_model: TrainedModel, cli: CliRunner
) -> None:
    a, b = schemes.a, schemes.b
    client = mlflow_scope.client(a)
    with promotion_lock(client, a.model_name, "holder of A"):
        with promotion_lock(client, b.model_name, "other", timeout_s=1):
            pass
        twin_b = copy_version(b, schemes.model_b)
        promotion.promote(b, version=twin_b, reason="while A is locked", actor="pytest")
    assert production(b) == twin_b
    before_b = snapshot(b)
    champion_a = production(a)
    second_a = copy_version(a, tiny_model)

    promoted = cli.invoke(
        app, ["promote", "--version", second_a, "--reason", "try", "--model-name", a.model_name]
    )
    assert promoted.exit_code == 0, promoted.output
    assert production(a) == second_a
    rolled = cli.invoke(app, ["rollback", "--reason", "undo", "--model-name", a.model_name])
    assert rolled.exit_code == 0, rolled.output
    assert production(a) == champion_a

    assert snapshot(b) == before_b
    listing = cli.invoke(app, ["models", "--model-name", a.model_name])
    assert listing.exit_code == 0, listing.output
    assert f"{a.model_name} versions" in listing.stdout
    assert f"-> v{champion_a} (rolled-back) by cli-test" in listing.stdout
    other = cli.invoke(app, ["models", "--model-name", b.model_name])
    assert other.exit_code == 0, other.output
    assert f"last production move: @production v{schemes.model_b.version} -> v{twin_b}" in (
        other.stdout
    )


def test_gate_refuses_a_candidate_of_another_scheme(schemes: Schemes, cli: CliRunner) -> None:
    a = schemes.a
    champion = production(a)
    stranger = copy_version(a, schemes.model_b)
    stage(a, stranger)

    result = cli.invoke(app, ["promote", "--auto", "--model-name", a.model_name])

    assert result.exit_code == gate.EXIT_REJECTED, result.output
    assert f"rejected v{stranger}" in result.stdout
    assert f"reads alphabet '{OTHER_ALPHABET}' (synthetic) but champion" in result.stdout
    assert "different schemes; register it under its own --model-name" in result.stdout
    assert production(a) == champion
    client = mlflow_scope.client(a)
    tags = client.get_model_version(a.model_name, stranger).tags
    assert (
        tags["validation_status"] == "rejected" and "different schemes" in tags["rejection_reason"]
    )
    (record,) = [m for m in history(a) if m.to_version == stranger]
    assert record.decision == "rejected" and record.actor == "cli-test"
    params = client.get_run(record.run_id).data.params
    assert params["evalset_digest"] == evalset.current_digest(mlflow_scope.client(a), a)


def test_gate_refuses_a_frozen_set_the_candidate_cannot_read(
    tracking_server: Tracking, tmp_path: Path, schemes: Schemes
) -> None:
    settings = make_settings(tracking_server, tmp_path, model_name=unique("scheme-d"))
    evalset.create_evalset(mlflow_scope.client(settings), settings, size=20)
    candidate = copy_version(settings, schemes.model_b)
    stage(settings, candidate)

    decision, move = gate.auto_promote(settings, actor="pytest")

    assert not decision.promote and decision.candidate is None
    assert "can never read" in decision.reason()
    assert f"--alphabet '{OTHER_ALPHABET}' --length 3-3" in decision.reason()
    assert move is not None and move.decision == "rejected"
    tags = mlflow_scope.client(settings).get_model_version(settings.model_name, candidate).tags
    assert tags["validation_status"] == "rejected"
    assert production(settings) is None


def test_serve_model_name_serves_that_scheme(schemes: Schemes, tmp_path: Path) -> None:
    b = schemes.b
    port = free_port()
    cmd = [str(VENV_BIN / "captchaops"), "serve", "--model-name", b.model_name, "--port", str(port)]
    env = {
        "PATH": str(VENV_BIN),
        "HOME": str(tmp_path),
        "CAPTCHAOPS_HOME": str(tmp_path),
        "CAPTCHAOPS_TRACKING_URI": b.effective_tracking_uri,
        "CAPTCHAOPS_SIGNING_PUBLIC_KEY": str(b.effective_signing_public_key),
    }
    proc = start_http_process(
        cmd, f"http://127.0.0.1:{port}/health", env=env, log=tmp_path / "serve.log"
    )
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}/version", timeout=30)
    finally:
        stop_process(proc)
    assert answer.status_code == 200, answer.text
    served = answer.json()
    assert (served["name"], served["alias"]) == (b.model_name, "production")
    assert served["version"] == production(b) and served["alphabet"] == OTHER_ALPHABET


def test_sample_data_and_evalset_options(
    tracking_server: Tracking, tmp_path: Path, cli: CliRunner
) -> None:
    name = unique("scheme-c")
    settings = make_settings(tracking_server, tmp_path, model_name=name)
    folder = tmp_path / "standin"
    written = cli.invoke(app, ["sample-data", str(folder), "--count", "12", "--seed", "3"])
    assert written.exit_code == 0, written.output
    assert written.stdout.strip() == (
        f"wrote 12 stand-in CAPTCHAs to {folder}; next: captchaops train --data {folder}"
    )
    again = cli.invoke(app, ["sample-data", str(folder)])
    assert again.exit_code == 1 and "not an empty folder" in again.stderr
    assert again.stderr.strip().count("\n") == 0

    only_folder = cli.invoke(
        app, ["evalset", "--model-name", name, "--folder", str(folder), "--size", "0"]
    )
    assert only_folder.exit_code == 0, only_folder.output
    frozen = evalset.load_evalset(
        mlflow_scope.client(settings),
        evalset.current_digest(mlflow_scope.client(settings), settings) or "",
    )
    assert sorted(frozen.labels) == sorted(p.stem for p in folder.iterdir())

    generated = cli.invoke(
        app,
        [
            "evalset", "--model-name", name, "--replace",
            "--alphabet", "XY", "--length", "2-3", "--size", "40",
        ],
    )  # fmt: skip
    assert generated.exit_code == 0, generated.output
    assert f"of {name} (40 images" in generated.stdout
    frozen = evalset.load_evalset(
        mlflow_scope.client(settings),
        evalset.current_digest(mlflow_scope.client(settings), settings) or "",
    )
    assert set("".join(frozen.labels)) == {"X", "Y"}
    assert {len(label) for label in frozen.labels} == {2, 3}

    bad = cli.invoke(app, ["evalset", "--model-name", name, "--replace", "--length", "5-2"])
    assert bad.exit_code == 1 and "--length 4-6" in bad.stderr
    assert bad.stderr.strip().count("\n") == 0
    bad_name = cli.invoke(app, ["models", "--model-name", "no spaces please"])
    assert bad_name.exit_code == 1 and "--model-name bank-captcha" in bad_name.stderr
