"""A hostile graph in a registered version never runs in a model server: the trial in a child
process refuses it (operators, shapes that depend on the request, NaN answers), the server's
memory and CPU stay low, it answers no NaN, and the next good version loads."""

from __future__ import annotations

import base64
import io
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import mlflow
import onnx
import psutil
import pytest
from PIL import Image

from captchaops import mlflow_scope
from captchaops.model.graph_policy import ALLOWED_OPS
from captchaops.model.version import file_sha256
from tests.fixtures.models import TrainedModel
from tests.fixtures.serving import staging_server, wait_refusal
from tests.fixtures.signing import signed_stage
from tests.fixtures.stack import Tracking
from tests.integration.test_gate import copy_version, isolated
from tests.unit.test_graph_policy import (
    constant_of_shape,
    endless_loop,
    nan_for_captchas,
    nan_when_dark,
    shape_from_batch_squared,
    shape_from_brightness,
)

pytestmark = pytest.mark.slow


def hostile_version(
    settings: object,
    base: TrainedModel,
    graph: onnx.ModelProto | Callable[[onnx.ModelProto], onnx.ModelProto],
) -> str:
    """A copy of `base` whose network is `graph` (or `graph` of base's network), signed
    (meta.json's digest matches it)."""
    client = mlflow_scope.client(settings)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(base.uri, dst_path=tmp))
        (network,) = local.glob("artifacts/*.onnx")
        if callable(graph):
            graph = graph(onnx.load(str(network)))
        onnx.save(graph, str(network))
        meta_path = local / "artifacts" / "meta.json"
        meta = json.loads(meta_path.read_text())
        signed: dict[str, object] = {"onnx_sha256": file_sha256(network)}
        if meta.get("onnx_ops"):  # an attacker records the graph's own op set
            signed["onnx_ops"] = sorted({node.op_type for node in graph.graph.node})
        meta_path.write_text(json.dumps(meta | signed))
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


def trials(process: psutil.Process) -> list[psutil.Process]:
    """`process`'s children that are trying a version (its decoding workers are not)."""
    found = []
    for child in process.children(recursive=True):
        try:
            if "captchaops.serving.trial" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def png(shade: int, size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("L", size, shade).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def no_nan(text: str) -> object:
    """`text` parsed as strict JSON: NaN and Infinity are refused, as JSON itself refuses them."""

    def refuse(constant: str) -> object:
        raise AssertionError(f"the answer holds {constant}, which is not JSON: {text[:200]}")

    return json.loads(text, parse_constant=refuse)


HOSTILE: list[tuple[onnx.ModelProto | Callable[[onnx.ModelProto], onnx.ModelProto], str]] = [
    (constant_of_shape(), "the operator ConstantOfShape"),
    (endless_loop(), "the operator Loop"),
    (shape_from_batch_squared, "neither a constant nor a multiple of the batch size"),
    (shape_from_brightness, "never from pixel values"),
    (nan_when_dark, "not finite numbers are refused"),
    (nan_for_captchas, "frozen evaluation set; versions whose outputs are not finite"),
]


def test_hostile_graphs_are_refused_and_the_next_good_version_loads(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path: Path, mlflow_client_env: str
) -> None:
    settings = isolated(tracking_server, tmp_path)
    good = copy_version(settings, tiny_model)
    with staging_server(
        tracking_server.uri, settings.model_name, good, tmp_path / "serve"
    ) as server:
        process = psutil.Process(server.proc.pid)
        assert process.rlimit(psutil.RLIMIT_AS)[0] == settings.serving_memory_mib * 2**20
        for graph, words in HOSTILE:
            bad = hostile_version(settings, tiny_model, graph)
            signed_stage(settings, bad)
            health = wait_refusal(server, bad)
            assert words in str(health["last_reload_error"])
            assert process.memory_info().rss < 300 * 2**20
            assert trials(process) == [], "the trial's child is still running"
        process.cpu_percent()
        time.sleep(2.0)
        assert process.cpu_percent() < 50, "a core is still busy after the refusals"
        # the requests that made the hostile versions costly, answered by the good one
        served = httpx.get(f"{server.url}/version", timeout=5).json()
        size = (int(served["width"]), int(served["height"]))
        for shades in ([255, 0], [0], [0] * 16, [255] * 16):
            answer = server.invoke({"inputs": [png(shade, size) for shade in shades]})
            assert answer.status_code == 200, answer.text
            assert answer.headers["X-Model-Version"] == good
            predictions = no_nan(answer.text)["predictions"]  # type: ignore[index]
            assert len(predictions) == len(shades)
        assert process.memory_info().rss < 500 * 2**20
        after = copy_version(settings, tiny_model)
        signed_stage(settings, after)
        server.wait_version(after)
