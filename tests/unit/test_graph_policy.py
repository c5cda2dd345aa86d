"""A version's graph is checked before it runs: only our exporter's operators, bounded tensors,
and opening plus warm-up in a child process that memory, CPU and time limits stop."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
from onnx import TensorProto, helper, numpy_helper

from captchaops.model import graph_policy
from captchaops.model.graph_policy import ALLOWED_OPS, GraphRefused, check_graph, op_set
from captchaops.model.version import VersionError, file_sha256, open_version
from captchaops.serving.trial import TrialFailed, TrialLimits, run_trial

HEIGHT, WIDTH, STEPS, ALPHABET = 32, 64, 16, "abcd"
MLMODEL = """\
flavors:
  python_function:
    artifacts:
      meta: {path: artifacts/meta.json}
      onnx_model: {path: artifacts/crnn.onnx}
signature:
  inputs: '[{"name": "image", "type": "string"}]'
  outputs: '[{"name": "text", "type": "string"}, {"name": "confidence", "type": "double"}]'
"""


def image_input() -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", HEIGHT, WIDTH, 1])


def probs_output(steps: int = STEPS, classes: int = len(ALPHABET) + 1) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", steps, classes])


def model_of(nodes: list[onnx.NodeProto], initializers: list[TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [image_input()], [probs_output()], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def honest() -> onnx.ModelProto:
    """image -> probs of the right shape, from allowed operators (a valid if useless reader)."""
    classes = len(ALPHABET) + 1
    weights = np.full((HEIGHT * WIDTH // STEPS, classes), 0.01, np.float32)
    return model_of(
        [
            helper.make_node("Reshape", ["image", "bt_f"], ["x"]),
            helper.make_node("MatMul", ["x", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        [
            numpy_helper.from_array(np.array([0, STEPS, -1], np.int64), "bt_f"),
            numpy_helper.from_array(weights, "w"),
        ],
    )


def spinning(multiplications: int = 400) -> onnx.ModelProto:
    """Allowed operators only, but a chain of 1500x1500 matrix products on the input's value."""
    nodes = [
        helper.make_node("Reshape", ["image", "flat"], ["pixels"]),
        helper.make_node("Gather", ["pixels", "zero"], ["pixel"]),
        helper.make_node("Expand", ["pixel", "square"], ["m0"]),
    ]
    for i in range(multiplications):
        nodes.append(helper.make_node("MatMul", [f"m{i}", f"m{i}"], [f"m{i + 1}"]))
    nodes.append(helper.make_node("Reshape", [f"m{multiplications}", "probs_shape"], ["probs"]))
    return model_of(
        nodes,
        [
            numpy_helper.from_array(np.array([-1], np.int64), "flat"),
            numpy_helper.from_array(np.array(0, np.int64), "zero"),
            numpy_helper.from_array(np.array([1500, 1500], np.int64), "square"),
            numpy_helper.from_array(np.array([1, -1, len(ALPHABET) + 1], np.int64), "probs_shape"),
        ],
    )


def hungry(copies: int = 48) -> onnx.ModelProto:
    """Allowed operators only, but 48 copies of a 4000x4000 float tensor (3 GB) concatenated."""
    model = spinning(0)
    graph = model.graph
    del graph.node[2:]
    graph.node.append(helper.make_node("Expand", ["pixel", "big"], ["m0"]))
    graph.node.append(helper.make_node("Concat", ["m0"] * copies, ["all"], axis=0))
    graph.node.append(helper.make_node("Reshape", ["all", "probs_shape"], ["probs"]))
    graph.initializer.append(numpy_helper.from_array(np.array([4000, 4000], np.int64), "big"))
    return model


def constant_of_shape() -> onnx.ModelProto:
    """The attack: a few bytes of graph that ask for 40 GB when loaded."""
    return model_of(
        [
            helper.make_node("ConstantOfShape", ["shape"], ["zeros"]),
            helper.make_node("Reshape", ["zeros", "probs_shape"], ["probs"]),
        ],
        [
            numpy_helper.from_array(np.array([100_000, 100_000], np.int64), "shape"),
            numpy_helper.from_array(np.array([1, -1, 5], np.int64), "probs_shape"),
        ],
    )


def endless_loop() -> onnx.ModelProto:
    """The attack: a Loop of 2**62 iterations."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])],
    )
    return model_of(
        [
            helper.make_node("Loop", ["trips", "cond"], [], body=body),
            helper.make_node("Identity", ["image"], ["probs"]),
        ],
        [
            numpy_helper.from_array(np.array(2**62, np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "cond"),
        ],
    )


def version_dir(root: Path, model: onnx.ModelProto, **meta_fields: object) -> Path:
    """A downloaded version's folder: MLmodel, the ONNX network and a matching meta.json."""
    (root / "artifacts").mkdir(parents=True)
    onnx_path = root / "artifacts" / "crnn.onnx"
    onnx.save(model, str(onnx_path))
    meta = {
        "schema_version": 1,
        "alphabet": ALPHABET,
        "min_length": 1,
        "max_length": 5,
        "height": HEIGHT,
        "width": WIDTH,
        "preprocessing": 1,
        "onnx_sha256": file_sha256(onnx_path),
        "scheme": "test",
        "data_kind": "synthetic",
    } | meta_fields
    (root / "artifacts" / "meta.json").write_text(json.dumps(meta))
    (root / "MLmodel").write_text(MLMODEL)
    return root


def saved(tmp_path: Path, model: onnx.ModelProto) -> Path:
    path = tmp_path / "graph.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def no_children_left() -> Callable[[], list[psutil.Process]]:
    """Children of this process started since the test began and still alive (other tests'
    module-scoped servers are not this test's)."""
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    return lambda: [c for c in psutil.Process().children(recursive=True) if c.pid not in before]


@pytest.mark.parametrize(
    ("model", "words"),
    [
        (constant_of_shape(), "ConstantOfShape"),
        (endless_loop(), "Loop"),
    ],
    ids=["ConstantOfShape", "Loop"],
)
def test_the_attack_graphs_are_refused_by_the_policy(
    model: onnx.ModelProto, words: str, tmp_path: Path
) -> None:
    with pytest.raises(GraphRefused, match=words):
        check_graph(saved(tmp_path, model))


def test_a_subgraph_is_refused_even_when_its_operator_is_allowed(tmp_path: Path) -> None:
    with pytest.raises(GraphRefused, match="subgraph"):
        check_graph(saved(tmp_path, endless_loop()), allowed=[*ALLOWED_OPS, "Loop"])


def test_bounded_tensors_shapes_and_outputs(tmp_path: Path) -> None:
    big = honest()
    big.graph.initializer.append(
        TensorProto(name="huge", data_type=TensorProto.FLOAT, dims=[50_000, 50_000])
    )
    with pytest.raises(GraphRefused, match="initializer 'huge' declares 2,500,000,000"):
        check_graph(saved(tmp_path, big))
    wide = spinning(0)
    wide.graph.initializer[2].CopyFrom(
        numpy_helper.from_array(np.array([100_000, 100_000], np.int64), "square")
    )
    with pytest.raises(GraphRefused, match="asks for a tensor of 10,000,000,000"):
        check_graph(saved(tmp_path, wide))
    declared = honest()
    declared.graph.output[0].CopyFrom(probs_output(steps=10_000, classes=10_000))
    with pytest.raises(GraphRefused, match="declares 100,000,000 values per image"):
        check_graph(saved(tmp_path, declared))


def test_an_initializer_kept_outside_the_file_is_refused(tmp_path: Path) -> None:
    model = honest()
    onnx.save(model, str(tmp_path / "x.onnx"), save_as_external_data=True, size_threshold=0)
    with pytest.raises(GraphRefused, match="outside the ONNX file"):
        check_graph(tmp_path / "x.onnx")


def test_an_honest_graph_passes_and_its_op_set_is_read(tmp_path: Path) -> None:
    path = saved(tmp_path, honest())
    assert check_graph(path) == op_set(path) == ["MatMul", "Reshape", "Softmax"]


def test_the_allow_list_can_be_extended_by_other_exporters() -> None:
    assert isinstance(graph_policy.ALLOWED_OPS, set)
    assert graph_policy.GRU_NODE_OPS | graph_policy.UNROLLED_OPS <= graph_policy.ALLOWED_OPS


def test_open_version_refuses_a_policy_breaking_graph(tmp_path: Path) -> None:
    with pytest.raises(VersionError, match="ConstantOfShape"):
        open_version(version_dir(tmp_path / "v", constant_of_shape()))


def test_a_recorded_op_set_must_match_the_graph(tmp_path: Path) -> None:
    folder = version_dir(tmp_path / "v", honest(), onnx_ops=["Conv", "GRU"])
    with pytest.raises(VersionError, match=r"differ from those meta\.json records"):
        open_version(folder)


def test_the_trial_of_an_honest_version_returns_its_op_set(
    tmp_path: Path, no_children_left: Callable[[], list[psutil.Process]]
) -> None:
    folder = version_dir(tmp_path / "v", honest(), onnx_ops=["MatMul", "Reshape", "Softmax"])
    assert run_trial(folder, TrialLimits(memory_bytes=2**31, cpu_seconds=30, wall_seconds=60)) == [
        "MatMul",
        "Reshape",
        "Softmax",
    ]
    assert no_children_left() == []


@pytest.mark.parametrize(
    ("model", "words"),
    [(constant_of_shape(), "ConstantOfShape"), (endless_loop(), "Loop")],
    ids=["ConstantOfShape", "Loop"],
)
def test_the_trial_refuses_the_attack_graphs(
    model: onnx.ModelProto,
    words: str,
    tmp_path: Path,
    no_children_left: Callable[[], list[psutil.Process]],
) -> None:
    with pytest.raises(TrialFailed, match=words):
        run_trial(version_dir(tmp_path / "v", model), TrialLimits(wall_seconds=60))
    assert no_children_left() == []


def test_a_graph_that_spins_is_stopped_at_its_cpu_limit(
    tmp_path: Path, no_children_left: Callable[[], list[psutil.Process]]
) -> None:
    folder = version_dir(tmp_path / "v", spinning())
    started = time.monotonic()
    with pytest.raises(TrialFailed, match=r"CPU|longer than"):
        run_trial(folder, TrialLimits(cpu_seconds=4, wall_seconds=60))
    assert time.monotonic() - started < 60
    assert no_children_left() == []


def test_a_graph_that_spins_is_killed_at_its_wall_clock_limit(
    tmp_path: Path, no_children_left: Callable[[], list[psutil.Process]]
) -> None:
    folder = version_dir(tmp_path / "v", spinning())
    with pytest.raises(TrialFailed, match="longer than 6 s; it was stopped"):
        run_trial(folder, TrialLimits(cpu_seconds=600, wall_seconds=6))
    assert no_children_left() == []


def test_a_graph_that_allocates_gigabytes_is_stopped_at_its_memory_limit(
    tmp_path: Path, no_children_left: Callable[[], list[psutil.Process]]
) -> None:
    folder = version_dir(tmp_path / "v", hungry())
    with pytest.raises(TrialFailed, match="MiB"):
        run_trial(folder, TrialLimits(memory_bytes=2**31, cpu_seconds=60, wall_seconds=60))
    assert no_children_left() == []
