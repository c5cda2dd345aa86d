"""A hostile graph in a registered version never runs in a model server: the trial in a child
process refuses it, the server's memory and CPU stay low, and the next good version loads."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import mlflow
import onnx
import psutil
import pytest

from captchaops import registry
from captchaops.model.graph_policy import ALLOWED_OPS
from captchaops.model.version import file_sha256
from tests.fixtures.models import TrainedModel
from tests.fixtures.serving import staging_server, wait_refusal
from tests.fixtures.stack import Tracking
from tests.integration.test_gate import copy_version, isolated, stage
from tests.unit.test_graph_policy import constant_of_shape, endless_loop

pytestmark = pytest.mark.slow


def hostile_version(settings: object, base: TrainedModel, graph: onnx.ModelProto) -> str:
    """A copy of `base` whose network is `graph`, signed (meta.json's digest matches it)."""
    client = registry.client(settings)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(base.uri, dst_path=tmp))
        (network,) = local.glob("artifacts/*.onnx")
        onnx.save(graph, str(network))
        meta_path = local / "artifacts" / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta_path.write_text(json.dumps(meta | {"onnx_sha256": file_sha256(network)}))
        experiment = mlflow.set_experiment("registry-tests")
        run = client.create_run(experiment.experiment_id, run_name="hostile graph")
        client.log_artifacts(run.info.run_id, str(local), "model")
        client.set_terminated(run.info.run_id)
    name = settings.model_name  # type: ignore[attr-defined]
    return str(mlflow.register_model(f"runs:/{run.info.run_id}/model", name).version)


def test_a_trained_version_records_its_op_set_which_the_policy_allows(
    tiny_model: TrainedModel, mlflow_client_env: str
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(tiny_model.uri, dst_path=tmp))
        meta = json.loads((local / "artifacts" / "meta.json").read_text())
        (network,) = local.glob("artifacts/*.onnx")
        ops = sorted({node.op_type for node in onnx.load(str(network)).graph.node})
    assert meta["onnx_ops"] == ops
    assert set(ops) <= ALLOWED_OPS
    run = mlflow.MlflowClient().get_run(tiny_model.run_id)
    assert run.data.params["onnx_ops"] == ",".join(ops)


def test_hostile_graphs_are_refused_and_the_next_good_version_loads(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path: Path, mlflow_client_env: str
) -> None:
    settings = isolated(tracking_server, tmp_path)
    good = copy_version(settings, tiny_model)
    with staging_server(
        tracking_server.uri, settings.model_name, good, tmp_path / "serve"
    ) as server:
        process = psutil.Process(server.proc.pid)
        for graph, operator in ((constant_of_shape(), "ConstantOfShape"), (endless_loop(), "Loop")):
            bad = hostile_version(settings, tiny_model, graph)
            stage(settings, bad)
            health = wait_refusal(server, bad)
            assert f"the operator {operator}" in str(health["last_reload_error"])
            assert process.memory_info().rss < 300 * 2**20
            assert process.children(recursive=True) == [], "the trial's child is still running"
        process.cpu_percent()
        time.sleep(2.0)
        assert process.cpu_percent() < 50, "a core is still busy after the refusals"
        after = copy_version(settings, tiny_model)
        stage(settings, after)
        server.wait_version(after)
