"""A version's graph is checked before it runs: only our exporter's operators, bounded tensors,
shapes that depend on the batch size alone, and opening plus warm-up at the largest batch in an
isolated child process that memory, CPU and time limits stop, refusing NaN answers."""

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

from captchaops.data.synthetic import generate_one
from captchaops.model import graph_policy
from captchaops.model.graph_policy import ALLOWED_OPS, GraphRefused, check_graph, op_set
from captchaops.model.version import VersionError, file_sha256, open_version
from captchaops.serving import trial
from captchaops.serving.decoding import reads_pixels
from captchaops.serving.loader import FiniteAnswers
from captchaops.serving.trial import NonFiniteOutput, TrialFailed, TrialLimits, run_trial

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


def hungry(copies: int = 48) -> onnx.ModelProto:  # now refused by the shape bounds
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


def _const(name: str, values: object, dtype: type = np.int64) -> TensorProto:
    return numpy_helper.from_array(np.array(values, dtype), name)


def with_side_branch(
    side: list[onnx.NodeProto],
    scalar: str,
    extra: list[TensorProto],
    base: onnx.ModelProto | None = None,
) -> onnx.ModelProto:
    """`base` (`honest()` by default; one of ours in the serving tests) whose output also adds
    the scalar `scalar` that the nodes `side` compute from "image": the shape of a hostile graph
    that otherwise answers like the network it was grafted on."""
    model = onnx.ModelProto()
    model.CopyFrom(base if base is not None else honest())
    graph = model.graph
    image, output = graph.input[0].name, graph.output[0].name
    for node in side:
        node.input[:] = [image if name == "image" else name for name in node.input]
    for node in graph.node:
        node.output[:] = [f"{output}_inner" if name == output else name for name in node.output]
    graph.node.extend([*side, helper.make_node("Add", [f"{output}_inner", scalar], [output])])
    graph.initializer.extend(extra)
    return model


def expanded_to(
    shape_nodes: list[onnx.NodeProto],
    shape: str,
    extra: list[TensorProto],
    base: onnx.ModelProto | None = None,
) -> onnx.ModelProto:
    """An honest graph that also expands one pixel to the shape `shape_nodes` compute."""
    side = [
        *shape_nodes,
        helper.make_node("Reshape", ["image", "flat"], ["pixels"]),
        helper.make_node("Gather", ["pixels", "zero"], ["pixel"]),
        helper.make_node("Expand", ["pixel", shape], ["big"]),
        helper.make_node("ReduceMean", ["big"], ["side"], keepdims=0),
    ]
    return with_side_branch(side, "side", [_const("flat", [-1]), _const("zero", 0), *extra], base)


def shape_via_identity() -> onnx.ModelProto:
    """The attack: the constant shape hidden behind an Identity, past the constant checks."""
    nodes = [helper.make_node("Identity", ["huge"], ["shape"])]
    return expanded_to(nodes, "shape", [_const("huge", [100_000, 100_000])])


def shape_via_cast() -> onnx.ModelProto:
    """The attack: the shape stored as floats and cast to integers."""
    nodes = [helper.make_node("Cast", ["huge"], ["shape"], to=TensorProto.INT64)]
    return expanded_to(nodes, "shape", [_const("huge", [100_000, 100_000], np.float32)])


def shape_from_brightness(base: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """The attack: a dark image asks for more: the shape is (1 - mean pixel) x 10^8 values."""
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["mean"], keepdims=0),
        helper.make_node("Sub", ["one", "mean"], ["dark"]),
        helper.make_node("Mul", ["dark", "scale"], ["amount"]),
        helper.make_node("Cast", ["amount"], ["count"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["count", "axis0"], ["shape"]),
    ]
    extra = [
        _const("one", 1.0, np.float32),
        _const("scale", 1e8, np.float32),
        _const("axis0", [0]),
    ]
    return expanded_to(nodes, "shape", extra, base)


def shape_from_batch_squared(base: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """The attack: Shape(image) gives the batch size, squared: one image costs 64 MB, a batch of
    16 costs 16 GB."""
    nodes = [
        helper.make_node("Shape", ["image"], ["dims"]),
        helper.make_node("Gather", ["dims", "axes0"], ["n"]),
        helper.make_node("Mul", ["n", "n"], ["nn"]),
        helper.make_node("Concat", ["nn", "square"], ["shape"], axis=0),
    ]
    extra = [_const("axes0", [0]), _const("square", [4000, 4000])]
    return expanded_to(nodes, "shape", extra, base)


def pad_from_pixels() -> onnx.ModelProto:
    """The attack: Pad amounts computed from the pixels."""
    side = [
        helper.make_node("ReduceMean", ["image"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "scale"], ["amount"]),
        helper.make_node("Cast", ["amount"], ["count"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["count", "axis0"], ["after"]),
        helper.make_node("Concat", ["zeros4", "after", "zeros3"], ["pads"], axis=0),
        helper.make_node("Pad", ["image", "pads"], ["padded"]),
        helper.make_node("ReduceMean", ["padded"], ["side"], keepdims=0),
    ]
    extra = [
        _const("scale", 1e6, np.float32),
        _const("axis0", [0]),
        _const("zeros4", [0, 0, 0, 0]),
        _const("zeros3", [0, 0, 0]),
    ]
    return with_side_branch(side, "side", extra)


def batch_by_batch() -> onnx.ModelProto:
    """The attack without any shape input: pixels [N, 2048] times their transpose, [N, N]."""
    side = [
        helper.make_node("Reshape", ["image", "rows"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["flat_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["flat", "flat_t"], ["gram"]),
        helper.make_node("ReduceMean", ["gram"], ["side"], keepdims=0),
    ]
    return with_side_branch(side, "side", [_const("rows", [0, -1])])


def lying_value_info() -> onnx.ModelProto:
    """The pixel-sized shape of `shape_from_brightness`, with value_info claiming it is known."""
    model = shape_from_brightness()
    model.graph.value_info.extend(
        [
            helper.make_tensor_value_info("big", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [1]),
        ]
    )
    return model


def nan_when_dark(base: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Allowed operators and constant shapes, but the output adds 0 x sqrt(mean pixel - 0.5):
    nothing for a light image, NaN everywhere for a dark one."""
    side = [
        helper.make_node("ReduceMean", ["image"], ["mean"], keepdims=0),
        helper.make_node("Sub", ["mean", "half"], ["centred"]),
        helper.make_node("Sqrt", ["centred"], ["rooted"]),
        helper.make_node("Mul", ["rooted", "nothing"], ["side"]),
    ]
    extra = [_const("half", 0.5, np.float32), _const("nothing", 0.0, np.float32)]
    return with_side_branch(side, "side", extra, base)


def nan_for_captchas(base: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Allowed operators and constant shapes, but the output adds 0 x sqrt(-(m - 0.7)(0.95 - m))
    of the mean pixel m: NaN only for a batch as bright as real CAPTCHAs (dark strokes on a light
    ground, m near 0.85), nothing for white (1), black (0) or noise (0.5) images."""
    side = [
        helper.make_node("ReduceMean", ["image"], ["mean"], keepdims=0),
        helper.make_node("Sub", ["mean", "low"], ["above"]),
        helper.make_node("Sub", ["high", "mean"], ["below"]),
        helper.make_node("Mul", ["above", "below"], ["inside"]),
        helper.make_node("Sub", ["zero", "inside"], ["outside"]),
        helper.make_node("Sqrt", ["outside"], ["rooted"]),
        helper.make_node("Mul", ["rooted", "zero"], ["side"]),
    ]
    extra = [
        _const("low", 0.7, np.float32),
        _const("high", 0.95, np.float32),
        _const("zero", 0.0, np.float32),
    ]
    return with_side_branch(side, "side", extra, base)


def hoarding_per_image(values: int = 4_000_000) -> onnx.ModelProto:
    """Constant shapes within the bounds, but three live [N, 4M] tensors: 48 MB for one image,
    3 GB at a batch of 64."""
    side = [
        helper.make_node("Reshape", ["image", "rows"], ["flat"]),
        helper.make_node("ReduceMean", ["flat"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Expand", ["mean", "wide"], ["a"]),
        helper.make_node("Add", ["a", "a"], ["b"]),
        helper.make_node("Add", ["b", "a"], ["c"]),
        helper.make_node("Add", ["c", "b"], ["d"]),
        helper.make_node("ReduceMean", ["d"], ["side"], keepdims=0),
    ]
    return with_side_branch(side, "side", [_const("rows", [0, -1]), _const("wide", [1, values])])


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


def test_a_graph_that_allocates_gigabytes_at_the_largest_batch_is_stopped_at_its_memory_limit(
    tmp_path: Path, no_children_left: Callable[[], list[psutil.Process]]
) -> None:
    folder = version_dir(tmp_path / "v", hoarding_per_image())
    assert "Expand" in run_trial(folder, TrialLimits(max_batch=1))  # one image: 48 MB
    with pytest.raises(TrialFailed, match="more than 1024 MiB"):  # the largest batch: 3 GB
        run_trial(folder, TrialLimits(memory_bytes=2**30, max_batch=64))
    assert no_children_left() == []


HOSTILE = [
    (shape_via_identity(), "10,000,000,000 values in all"),
    (shape_via_cast(), "10,000,000,000 values in all"),
    (hungry(), "768,000,000 values in all"),
    (shape_from_brightness(), "through Sub"),
    (pad_from_pixels(), "input 'mean' of node 'Pad' sets a shape or size through ReduceMean"),
    (shape_from_batch_squared(), "1 at batch 1, 4 at batch 2, 4096 at batch 64"),
    (batch_by_batch(), "square of the batch size"),
]


@pytest.mark.parametrize(
    ("model", "words"),
    HOSTILE,
    ids=["identity", "cast", "hungry", "brightness", "pad", "batch-squared", "batch-by-batch"],
)
def test_graphs_whose_cost_depends_on_the_request_are_refused(
    model: onnx.ModelProto, words: str, tmp_path: Path
) -> None:
    with pytest.raises(GraphRefused, match=words):
        check_graph(saved(tmp_path, model), geometry=(HEIGHT, WIDTH, 1))
    with pytest.raises(VersionError, match=words):  # where servers and the gate open versions
        open_version(version_dir(tmp_path / "v", model))


def test_shape_inference_alone_refuses_a_shape_read_from_pixels_whatever_value_info_claims(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(graph_policy, "SHAPE_ARGUMENTS", {})  # the first check gone
    with pytest.raises(GraphRefused, match=r"'big' .* is not known from the batch size alone"):
        check_graph(saved(tmp_path, lying_value_info()), geometry=(HEIGHT, WIDTH, 1))


def test_shapes_from_the_batch_size_alone_pass(tmp_path: Path) -> None:
    """A Reshape whose shape comes from Shape(image) (as Keras' export has) is a function of the
    batch size; so is an honest graph's [0, T, -1]."""
    nodes = [
        helper.make_node("Shape", ["image"], ["dims"]),
        helper.make_node("Gather", ["dims", "axes0"], ["n"]),
        helper.make_node("Concat", ["n", "rest"], ["shape"], axis=0),
    ]
    model = expanded_to(nodes, "shape", [_const("axes0", [0]), _const("rest", [STEPS, 8])])
    assert "Shape" in check_graph(saved(tmp_path, model), geometry=(HEIGHT, WIDTH, 1))
    assert check_graph(saved(tmp_path, honest()), geometry=(HEIGHT, WIDTH, 1), max_batch=256)


def test_an_open_input_is_fixed_to_the_declared_geometry(tmp_path: Path) -> None:
    model = honest()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[1].dim_param, dims[2].dim_param = "height", "width"
    path = saved(tmp_path, model)
    assert check_graph(path) == ["MatMul", "Reshape", "Softmax"]  # no geometry: checked later
    assert check_graph(path, geometry=(HEIGHT, WIDTH, 1))
    with pytest.raises(GraphRefused, match=r"not known from the batch size alone|shape inference"):
        check_graph(path, geometry=(HEIGHT, WIDTH + 3, 1))  # [0, 16, -1] does not divide


def test_the_trial_refuses_a_version_that_answers_nan_for_a_dark_image(
    tmp_path: Path, no_children_left: Callable[[], list[psutil.Process]]
) -> None:
    folder = version_dir(tmp_path / "v", nan_when_dark())
    assert check_graph(folder / "artifacts" / "crnn.onnx", geometry=(HEIGHT, WIDTH, 1))
    with pytest.raises(TrialFailed, match="not finite numbers are refused"):
        run_trial(folder, TrialLimits(wall_seconds=60))
    assert no_children_left() == []


def test_the_trial_and_the_warm_up_refuse_a_version_that_answers_nan_only_for_real_captchas(
    tmp_path: Path, no_children_left: Callable[[], list[psutil.Process]]
) -> None:
    """White, black and noise images miss it; a batch of the scheme's frozen-set images (here
    generated CAPTCHAs, as a synthetic scheme's frozen set holds) does not."""
    folder = version_dir(tmp_path / "v", nan_for_captchas())
    limits = TrialLimits(wall_seconds=60, max_batch=4)
    assert "Sqrt" in run_trial(folder, limits)  # passes on the synthetic images alone
    frozen = [generate_one(seed).image for seed in range(3)]  # fewer than a batch: repeated
    with pytest.raises(TrialFailed, match="frozen evaluation set; versions whose outputs"):
        run_trial(folder, limits, frozen)
    model = open_version(folder)
    trial.warm_up(model, 4)
    with pytest.raises(NonFiniteOutput, match="frozen evaluation set"):
        trial.warm_up(model, 4, frozen)
    assert no_children_left() == []


def test_a_served_version_never_answers_nan(tmp_path: Path) -> None:
    reader = open_version(version_dir(tmp_path / "v", nan_when_dark()))
    model = FiniteAnswers.wrap(reader)
    white, black, _ = trial._probes(model.meta)
    assert 0.0 <= model.predict_images([white])[0]["confidence"] <= 1.0
    with pytest.raises(NonFiniteOutput, match="not a finite number"):
        model.predict_images([black])
    dark = np.zeros((1, HEIGHT, WIDTH, 1), np.uint8)  # as the decoding workers hand pixels over
    with pytest.raises(NonFiniteOutput, match="not a finite number"):
        model.predict_pixels(dark)  # type: ignore[attr-defined]
    assert reads_pixels(model)


def test_a_version_that_reads_only_bytes_still_does_once_checked() -> None:
    class BytesOnly:
        meta: dict[str, object] = {"height": HEIGHT, "width": WIDTH}

        def predict_images(self, images: list[bytes]) -> list[dict[str, object]]:
            return [{"text": "ab", "confidence": float("inf")} for _ in images]

    model = FiniteAnswers.wrap(BytesOnly())  # type: ignore[arg-type]
    assert not reads_pixels(model)
    with pytest.raises(NonFiniteOutput):
        model.predict_images([b"x"])


def test_the_trial_child_is_isolated(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_children_left: Callable[[], list[psutil.Process]],
) -> None:
    """No secret reaches the child, and PYTHONPATH cannot put another trial in its place."""
    shadow = tmp_path / "shadow" / "captchaops" / "serving"
    shadow.mkdir(parents=True)
    for init in (shadow.parent / "__init__.py", shadow / "__init__.py"):
        init.write_text("")
    (shadow / "trial.py").write_text('print(\'{"ops": ["Shadowed"]}\')\n')
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "shadow"))
    monkeypatch.setenv("CAPTCHAOPS_SERVING_TOKEN", "s3cret")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    env = trial.child_environment()
    assert "s3cret" not in env.values()
    assert not [k for k in env if k.startswith(("MLFLOW_", "CAPTCHAOPS_", "PYTHON"))]
    folder = version_dir(tmp_path / "v", honest())
    limits = TrialLimits(wall_seconds=60, max_batch=2)
    assert run_trial(folder, limits) == ["MatMul", "Reshape", "Softmax"]
    assert no_children_left() == []


def test_the_trial_reads_at_most_its_output_limit(tmp_path: Path) -> None:
    noisy = tmp_path / "out"
    noisy.write_bytes(b"x" * (trial.OUTPUT_BYTES * 4))
    assert len(trial._head(noisy)) == trial.OUTPUT_BYTES


def test_one_cpu_budget_for_the_trial_and_the_warm_up() -> None:
    from captchaops.serving.loader import Timeouts, VersionLoader
    from captchaops.settings import Settings

    settings = Settings(version_cpu_seconds=12, max_batch_images=32)
    limits = TrialLimits.for_settings(settings)
    assert (limits.cpu_seconds, limits.max_batch) == (12, 32)
    loader = VersionLoader(None, Path("/nonexistent"), Timeouts(warm_up=7.0))  # type: ignore[arg-type]
    assert loader.trial.cpu_seconds == 7  # the warm-up's limit is the trial's budget
