"""The gate on a real tracking server with real tiny models and deliberately damaged copies of them.

Tiny test models read no CAPTCHA correctly (accuracy 0, CER 1.0: they emit blanks), so
"worse" is a copy whose ONNX graph spells alternating characters at every time step
(CER far above 1), and
"broken" is a copy whose ONNX file is garbage. Accuracy thresholds are covered with
exact numbers in tests/unit/test_gate.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
from mlflow import MlflowClient
from onnx import helper, numpy_helper

from captchaops import mlflow_scope
from captchaops.decisions import gate, promotion
from captchaops.evaluation import evalset, report
from captchaops.live.estimate import Calibration
from captchaops.mlflow_scope import pointed_at
from captchaops.model.graph_policy import op_set
from captchaops.model.version import file_sha256
from captchaops.registry.aliases import resolve_alias
from captchaops.registry.audit import AUDIT_EXPERIMENT
from captchaops.settings import Settings
from tests.fixtures.models import TrainedModel, make_settings
from tests.fixtures.stack import Tracking

pytestmark = pytest.mark.slow
EVAL_SIZE = 200


def isolated(tracking_server: Tracking, tmp_path: Path, **overrides: object) -> Settings:
    """Settings with a model name no other test uses, and a small frozen set for it."""
    settings = make_settings(
        tracking_server, tmp_path, model_name=f"gate-{uuid.uuid4().hex[:8]}", **overrides
    )
    evalset.create_evalset(mlflow_scope.client(settings), settings, size=EVAL_SIZE)
    return settings


def copy_version(settings: Settings, base: TrainedModel) -> str:
    """Register the base model's artifacts again as a new version of settings.model_name."""
    client = mlflow_scope.client(settings)
    source = client.get_model_version(base.model_name, base.version).source
    with pointed_at(settings):
        return str(mlflow.register_model(source, settings.model_name).version)


def damaged_version(settings: Settings, base: TrainedModel, how: str) -> str:
    """Register a copy whose ONNX network is 'junk' (spells junk) or 'corrupt' (unloadable)."""
    client = mlflow_scope.client(settings)
    with tempfile.TemporaryDirectory() as tmp, pointed_at(settings):
        local = Path(mlflow.artifacts.download_artifacts(base.uri, dst_path=tmp))
        (network,) = local.glob("artifacts/*.onnx")
        meta_path = local / "artifacts" / "meta.json"
        meta = json.loads(meta_path.read_text())
        if how == "corrupt":
            network.write_bytes(b"this is not an onnx model" * 100)
        else:
            _emit_junk(network, meta)
        # Registered by someone who signs what they register: the digest matches the new bytes.
        signed = {"onnx_sha256": file_sha256(network)}
        if how != "corrupt":
            signed["onnx_ops"] = op_set(network)  # type: ignore[assignment]
        meta_path.write_text(json.dumps(meta | signed))
        experiment = mlflow.set_experiment("registry-tests")
        run = client.create_run(experiment.experiment_id, run_name=f"{how} copy")
        client.log_artifacts(run.info.run_id, str(local), "model")
        client.set_terminated(run.info.run_id)
        uri = f"runs:/{run.info.run_id}/model"
        return str(mlflow.register_model(uri, settings.model_name).version)


def _emit_junk(path: Path, meta: dict[str, object]) -> None:
    """Replace the output with probabilities that spell alternating characters at every step."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shape = (1, int(meta["height"]), int(meta["width"]), 1)  # type: ignore[call-overload]
    steps, classes = session.run(None, {session.get_inputs()[0].name: np.zeros(shape, np.float32)})[
        0
    ].shape[1:]
    pattern = np.zeros((steps, classes), dtype=np.float32)
    pattern[np.arange(steps), np.arange(steps) % 2] = 1.0
    model = onnx.load(str(path))
    output = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{output}_raw" if o == output else o for o in node.output]
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.zeros((), np.float32), "zero"),
            numpy_helper.from_array(pattern, "junk"),
        ]
    )
    model.graph.node.extend(
        [
            helper.make_node("Mul", [f"{output}_raw", "zero"], [f"{output}_zero"]),
            helper.make_node("Add", [f"{output}_zero", "junk"], [output]),
        ]
    )
    onnx.save(model, str(path))


def stage(settings: Settings, version: str) -> None:
    """Point @staging at a version, as training does."""
    mlflow_scope.client(settings).set_registered_model_alias(
        settings.model_name, "staging", version
    )


def production(settings: Settings) -> str | None:
    """The version holding @production."""
    return resolve_alias(settings, "production")


def test_first_candidate_is_promoted_and_stage_resolves(
    tracking_server: Tracking, tmp_path: Path, tiny_model: TrainedModel
) -> None:
    settings = isolated(tracking_server, tmp_path)
    version = copy_version(settings, tiny_model)
    stage(settings, version)

    decision, move = gate.auto_promote(settings, actor="pytest")

    assert decision.promote, decision.refusals
    assert move is not None and move.to_version == version and move.from_version is None
    assert production(settings) == version
    client = mlflow_scope.client(settings)
    assert client.get_model_version(settings.model_name, version).current_stage == "Production"
    tags = client.get_model_version(settings.model_name, version).tags
    calibration = Calibration.from_tags(tags)  # for the servers' live accuracy estimate
    assert calibration is not None and calibration.size == len(
        evalset.load_evalset(mlflow_scope.client(settings), tags["eval_digest"])
    )
    assert calibration.accuracy == pytest.approx(decision.candidate.seq_acc, abs=1e-6)
    with pointed_at(settings):
        loaded = mlflow.pyfunc.load_model(f"models:/{settings.model_name}/Production")
    assert loaded.metadata.run_id == client.get_model_version(settings.model_name, version).run_id
    assert loaded.unwrap_python_model().reader.predict_images(
        [
            evalset.load_evalset(
                mlflow_scope.client(settings),
                evalset.current_digest(mlflow_scope.client(settings), settings) or "",
            ).images[0]
        ]
    )
    # The gate logged the version's visual report to its run, about this frozen set.
    run_id = client.get_model_version(settings.model_name, version).run_id
    files = {f.path for f in client.list_artifacts(run_id, "report")}
    assert files == {f"report/{name}" for name in ("report.json", *report.PNG_FILES)}
    found = json.loads(
        Path(client.download_artifacts(run_id, "report/report.json", tmp_path)).read_text()
    )
    assert (found["evalset_digest"], found["n"], found["version"]) == (
        decision.digest,
        EVAL_SIZE,
        version,
    )
    assert found["seq_acc"] == pytest.approx(decision.candidate.seq_acc)
    assert sum(b["n"] for b in found["reliability"]) == EVAL_SIZE


def test_first_candidate_below_the_floor_is_rejected(
    tracking_server: Tracking, tmp_path: Path, tiny_model: TrainedModel
) -> None:
    settings = isolated(tracking_server, tmp_path)
    stage(settings, copy_version(settings, tiny_model))

    decision, move = gate.auto_promote(settings, gate.GateConfig(floor=0.5), actor="pytest")

    assert not decision.promote and "below the floor" in decision.reason()
    assert move is not None and move.decision == "rejected"
    assert production(settings) is None


def test_better_candidate_is_promoted_and_worse_rejected(
    tracking_server: Tracking, tmp_path: Path, tiny_model: TrainedModel
) -> None:
    settings = isolated(tracking_server, tmp_path)
    junk = damaged_version(settings, tiny_model, "junk")
    promotion.promote(settings, version=junk, reason="seed the champion", actor="pytest")
    better = copy_version(settings, tiny_model)
    stage(settings, better)

    decision, _ = gate.auto_promote(settings, actor="pytest")

    assert decision.promote, decision.refusals
    assert decision.candidate is not None and decision.champion is not None
    assert decision.candidate.cer < decision.champion.cer
    assert production(settings) == better

    worse = damaged_version(settings, tiny_model, "junk")
    stage(settings, worse)
    decision, move = gate.auto_promote(settings, actor="pytest")

    assert not decision.promote and "CER" in decision.reason()
    assert production(settings) == better
    client = mlflow_scope.client(settings)
    tags = client.get_model_version(settings.model_name, worse).tags
    assert tags["validation_status"] == "rejected" and "CER" in tags["rejection_reason"]
    assert move is not None
    record = client.get_run(move.run_id).data
    assert record.tags["decision"] == "rejected"
    assert {
        "candidate_seq_acc",
        "candidate_cer",
        "champion_seq_acc",
        "champion_cer",
        "candidate_p95_ms",
        "champion_p95_ms",
    } <= set(record.metrics)
    assert record.params["from_version"] == better and record.params["to_version"] == worse
    assert record.params["threshold_margin"] == "0.0"


def test_broken_candidate_is_rejected(
    tracking_server: Tracking, tmp_path: Path, tiny_model: TrainedModel
) -> None:
    settings = isolated(tracking_server, tmp_path)
    champion = copy_version(settings, tiny_model)
    stage(settings, champion)
    gate.auto_promote(settings, actor="pytest")
    broken = damaged_version(settings, tiny_model, "corrupt")
    stage(settings, broken)

    decision, move = gate.auto_promote(settings, actor="pytest")

    assert not decision.promote
    assert "failed to load or predict" in decision.reason()
    assert production(settings) == champion
    assert move is not None and move.decision == "rejected"


def test_margin_is_respected(
    tracking_server: Tracking, tmp_path: Path, tiny_model: TrainedModel
) -> None:
    settings = isolated(tracking_server, tmp_path)
    champion = copy_version(settings, tiny_model)
    promotion.promote(settings, version=champion, reason="seed the champion", actor="pytest")
    twin = copy_version(settings, tiny_model)
    stage(settings, twin)

    decision, _ = gate.auto_promote(settings, gate.GateConfig(margin=0.05), actor="pytest")
    assert not decision.promote and "margin 0.05" in decision.reason()
    assert production(settings) == champion

    other_twin = copy_version(settings, tiny_model)
    stage(settings, other_twin)
    decision, _ = gate.auto_promote(settings, gate.GateConfig(margin=0.0), actor="pytest")
    assert decision.promote, decision.refusals
    assert production(settings) == other_twin


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CAPTCHAOPS_HOME": str(settings.home),
        "CAPTCHAOPS_TRACKING_URI": settings.effective_tracking_uri,
        "CAPTCHAOPS_MODEL_NAME": settings.model_name,
        "CAPTCHAOPS_STAGING_FLOOR": "0",
        "CAPTCHAOPS_ACTOR": "ci-test",
    }
    captchaops = Path(sys.executable).parent / "captchaops"
    return subprocess.run(
        [str(captchaops), *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_exit_codes(
    tracking_server: Tracking, tmp_path: Path, tiny_model: TrainedModel
) -> None:
    settings = isolated(tracking_server, tmp_path)

    nothing = _cli(settings, "promote", "--auto")
    assert nothing.returncode == gate.EXIT_ERROR
    assert nothing.stderr.strip().count("\n") == 0 and "@staging" in nothing.stderr

    stage(settings, copy_version(settings, tiny_model))
    promoted = _cli(settings, "promote", "--auto")
    assert promoted.returncode == gate.EXIT_PROMOTED, promoted.stderr
    assert "promoted" in promoted.stdout

    stage(settings, damaged_version(settings, tiny_model, "junk"))
    rejected = _cli(settings, "promote", "--auto")
    assert rejected.returncode == gate.EXIT_REJECTED, rejected.stderr
    assert "rejected" in rejected.stdout

    client = MlflowClient(
        settings.effective_tracking_uri, registry_uri=settings.effective_tracking_uri
    )
    actors = {
        run.data.params["actor"]
        for run in client.search_runs(
            [client.get_experiment_by_name(AUDIT_EXPERIMENT).experiment_id],
            f"tags.model_name = '{settings.model_name}'",
        )
    }
    assert actors == {"ci-test"}
