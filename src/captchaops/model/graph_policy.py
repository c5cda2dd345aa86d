"""Which ONNX graphs a version may carry: allowed operators, bounded tensors, no subgraphs, and
every shape a function of the batch size alone.

A registered version's graph is data from whoever can write to the registry. The file checks
(size, digest) cannot tell a CRNN from a `ConstantOfShape` that allocates gigabytes or a `Loop`
that never ends, so the graph is read (never run) and refused unless every node is an operator
our exporter emits, every constant tensor and every constant shape is bounded and nothing nests
a subgraph.

A graph built only from allowed operators can still make its cost depend on the request: a
Reshape or Expand whose shape is computed from the pixels, or from the batch size squared,
allocates what the request asks for. So every shape argument (`SHAPE_ARGUMENTS`) must be
computed from constants and tensor shapes only (`SHAPE_PATH_OPS`), and ONNX shape inference, with
the input fixed to the version's geometry, must know every tensor's shape at batch sizes 1, 2
and the server's largest, each dimension a constant or a multiple of the batch, at most one per
tensor: the cost of any request is then at most that of the largest batch, which the trial
(`captchaops.serving.trial`) runs in a limited child process before a server loads a version.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

GRU_NODE_OPS = frozenset(
    {
        "Add", "Cast", "Concat", "Conv", "GRU", "Gather", "MatMul", "MaxPool", "Relu",
        "Reshape", "Shape", "Softmax", "Transpose",
    }
)  # fmt: skip
"""Operators of `onnx_export`'s graph with the BiGRU as one ONNX GRU node."""
UNROLLED_OPS = frozenset(
    {
        "Add", "Cast", "Concat", "Conv", "Expand", "Gather", "MatMul", "MaxPool", "Mul",
        "ReduceProd", "Relu", "Reshape", "ReverseSequence", "Shape", "Sigmoid", "Slice",
        "Softmax", "Split", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze",
    }
)  # fmt: skip
"""Operators of Keras' own (unrolled) export, `onnx_export`'s fallback."""
FOREIGN_EXPORT_OPS = frozenset(
    {
        "AveragePool", "BatchNormalization", "Clip", "Constant", "Div", "Dropout", "Elu",
        "Flatten", "Gemm", "GlobalAveragePool", "Identity", "LSTM", "LeakyRelu", "Log",
        "LogSoftmax", "Pad", "Pow", "ReduceMean", "Sqrt",
    }
)  # fmt: skip
"""What PyTorch (`torch.onnx.export`) and Keras/TensorFlow (tf2onnx) CRNN exports add to ours:
networks trained elsewhere enter through `captchaops register` (`training/imported.py`)."""
ALLOWED_OPS: set[str] = set(GRU_NODE_OPS | UNROLLED_OPS | FOREIGN_EXPORT_OPS)
"""Every operator a served graph may use (default ONNX domain only). Exporters for other
frameworks add theirs here, each after reading a freshly exported model's op set."""
ALLOWED_DOMAINS = frozenset({"", "ai.onnx"})
MAX_TENSOR_ELEMENTS = 16_000_000
"""Largest initializer or constant (64 MB of float32); our biggest weight is under 1M."""
MAX_SHAPE_ELEMENTS = 16_000_000
"""Largest tensor a constant shape fed to Reshape/Expand may ask for."""
MAX_OUTPUT_ELEMENTS = 1_000_000
"""Largest declared output per image (fixed dimensions multiplied): ours is steps x classes."""
MAX_IMAGE_ELEMENTS = 4_000_000
"""Largest intermediate tensor per image (16 MB of float32); our CRNN's largest is 41k."""
MAX_BATCH = 64
"""The largest batch checked when the caller names none (`Settings.max_batch_images`)."""
SHAPE_ARGUMENTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Slice": (1, 2, 3, 4), "Pad": (1, 3), "Split": (1,),
    "Squeeze": (1,), "Unsqueeze": (1,), "ReduceMean": (1,), "ReduceProd": (1,), "Tile": (1,),
    "ConstantOfShape": (0,), "Resize": (1, 2, 3), "Upsample": (1,), "TopK": (1,),
    "Range": (0, 1, 2), "OneHot": (1,),
}  # fmt: skip
"""Operator inputs that set a shape, a size, an amount of padding or a bound: each must be a
constant, or computed from constants and tensor shapes (`Shape`) by `SHAPE_PATH_OPS` only."""
SHAPE_PATH_OPS = frozenset(
    {"Cast", "Concat", "Constant", "Gather", "Identity", "Mul", "ReduceProd", "Shape", "Slice",
     "Squeeze", "Unsqueeze"}
)  # fmt: skip
"""What may compute a shape argument: nothing that reads pixel values, and no Add, Sub or Div
(no offsets, no polynomial of the batch size that vanishes where it is checked)."""
_SHAPE_INPUTS = {"Reshape": 1, "Expand": 1}
_FOLD_ROUNDS = 8
_FOLD_ELEMENTS = 4096


class GraphRefused(ValueError):
    """A graph that breaks the policy; the message is one line saying what and how to fix it."""


def op_set(path: Path) -> list[str]:
    """The sorted operator types of the ONNX graph at `path` (recorded with each version)."""
    return sorted({node.op_type for node in _load(path).graph.node})


def input_geometry(meta: Any) -> tuple[int, int, int]:
    """The input's dimensions after the batch that a version's meta.json (or VersionMeta)
    declares, in its layout: (height, width, channels) or (channels, height, width)."""
    fields: dict[str, Any] = meta if isinstance(meta, dict) else meta.model_dump()
    height, width = int(fields["height"]), int(fields["width"])
    channels = int(fields.get("channels") or 1)
    if fields.get("input_layout", "NHWC") == "NCHW":
        return (channels, height, width)
    return (height, width, channels)


def check_graph(
    path: Path,
    allowed: Iterable[str] | None = None,
    *,
    geometry: Sequence[int] | None = None,
    max_batch: int = MAX_BATCH,
) -> list[str]:
    """Refuse the graph at `path` unless it follows the policy; returns its sorted op set.

    `geometry` fixes the input's dimensions after the batch (`input_geometry`); without it, a
    graph whose input leaves one open has its shapes checked only where a version is opened."""
    model = _load(path)
    ops = set(allowed) if allowed is not None else ALLOWED_OPS
    graph = model.graph
    constants: dict[str, TensorProto] = {}
    for tensor in graph.initializer:
        _check_tensor(tensor, f"initializer {tensor.name!r}")
        constants[tensor.name] = tensor
    for node in graph.node:
        if node.domain not in ALLOWED_DOMAINS or node.op_type not in ops:
            shown = f"{node.domain}:{node.op_type}" if node.domain else node.op_type
            raise GraphRefused(
                f"the graph uses the operator {shown}, which served versions may not use; "
                "export the model with captchaops (allowed: see graph_policy.ALLOWED_OPS)"
            )
        for attribute in node.attribute:
            if attribute.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
                raise GraphRefused(
                    f"node {node.name or node.op_type!r} nests a subgraph; "
                    "served graphs must be flat"
                )
            if attribute.type == AttributeProto.TENSOR:
                _check_tensor(attribute.t, f"the constant of node {node.name or node.op_type!r}")
                if node.op_type == "Constant":
                    constants[node.output[0]] = attribute.t
        position = _SHAPE_INPUTS.get(node.op_type)
        if position is not None and len(node.input) > position:
            shape = constants.get(node.input[position])
            if shape is not None:
                _check_shape(shape, node)
    for output in graph.output:
        _check_output(output)
    _check_shape_arguments(graph)
    _check_batch_shapes(model, geometry, max_batch)
    return sorted({node.op_type for node in graph.node})


def _load(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError, not a subclass of OSError
        raise GraphRefused(f"the ONNX file cannot be parsed ({exc}); export it again") from exc


def _check_tensor(tensor: TensorProto, what: str) -> None:
    if tensor.data_location == TensorProto.EXTERNAL or tensor.external_data:
        raise GraphRefused(f"{what} keeps its data outside the ONNX file; embed it in the file")
    elements = math.prod(int(d) for d in tensor.dims)
    if any(d < 0 for d in tensor.dims) or elements > MAX_TENSOR_ELEMENTS:
        raise GraphRefused(
            f"{what} declares {elements:,} elements, more than {MAX_TENSOR_ELEMENTS:,}; "
            "served models must be small"
        )


def _check_shape(shape: TensorProto, node: onnx.NodeProto) -> None:
    values = onnx.numpy_helper.to_array(shape).reshape(-1).tolist()
    elements = math.prod(max(int(v), 1) for v in values)
    if elements > MAX_SHAPE_ELEMENTS:
        raise GraphRefused(
            f"node {node.name or node.op_type!r} asks for a tensor of {elements:,} elements, "
            f"more than {MAX_SHAPE_ELEMENTS:,}; served models must be small"
        )


def _check_output(output: onnx.ValueInfoProto) -> None:
    dims = output.type.tensor_type.shape.dim
    fixed = [int(d.dim_value) for d in dims[1:] if d.HasField("dim_value")]
    if math.prod(fixed) > MAX_OUTPUT_ELEMENTS:
        raise GraphRefused(
            f"the output {output.name!r} declares {math.prod(fixed):,} values per image, more "
            f"than {MAX_OUTPUT_ELEMENTS:,}; a CAPTCHA reader outputs steps x classes"
        )


def _check_shape_arguments(graph: onnx.GraphProto) -> None:
    """Refuse a shape argument computed from anything but constants and tensor shapes."""
    producers = {out: node for node in graph.node for out in node.output if out}
    constants = {t.name for t in graph.initializer}
    settled: set[str] = set()

    def follow(name: str, node: onnx.NodeProto, trail: int) -> None:
        if name in settled or name in constants:
            return
        producer = producers.get(name)
        where = f"input {name!r} of node {node.name or node.op_type!r}"
        if producer is None:
            raise GraphRefused(
                f"the {where} sets a shape or size from the image's pixels; served graphs "
                "take shapes from constants and the batch size only"
            )
        if producer.op_type not in SHAPE_PATH_OPS or trail > 10_000:
            raise GraphRefused(
                f"the {where} sets a shape or size through {producer.op_type}; served graphs "
                "compute shapes from constants and tensor shapes only (Shape, Gather, Concat, "
                "Cast, Mul ...), never from pixel values"
            )
        settled.add(name)
        if producer.op_type != "Shape":  # a shape is checked below as a function of the batch
            for source in producer.input:
                if source:
                    follow(source, node, trail + 1)

    for node in graph.node:
        for position in SHAPE_ARGUMENTS.get(node.op_type, ()):
            if len(node.input) > position and node.input[position]:
                follow(node.input[position], node, 0)


def _check_batch_shapes(
    model: onnx.ModelProto, geometry: Sequence[int] | None, max_batch: int
) -> None:
    """Refuse a graph unless shape inference knows every tensor's shape at batch sizes 1, 2
    and `max_batch`, each dimension a constant or a multiple of the batch (one at most)."""
    constants = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in constants]
    if len(inputs) != 1:
        raise GraphRefused(f"the graph takes {len(inputs)} inputs, not one image batch")
    declared = inputs[0].type.tensor_type.shape.dim
    fixed = [int(d.dim_value) if d.HasField("dim_value") else None for d in declared[1:]]
    if geometry is not None and len(geometry) == len(fixed):
        fixed = [f if f is not None else int(g) for f, g in zip(fixed, geometry, strict=True)]
    dims = [f for f in fixed if f is not None and f >= 1]
    if not declared or len(dims) != len(fixed):
        if geometry is None:
            return  # the input leaves a size open: checked when a version declares it
        raise GraphRefused(
            "the graph's input does not match the geometry meta.json declares; export the "
            "network with a fixed height, width and channels"
        )
    sizes = sorted({1, 2, max(int(max_batch), 2)})
    shapes = [_inferred(model, inputs[0].name, [batch, *dims]) for batch in sizes]
    for name in shapes[0]:
        _check_growth(name, [s.get(name) for s in shapes], sizes)


def _inferred(model: onnx.ModelProto, name: str, dims: list[int]) -> dict[str, list[int]]:
    """Every node output's shape by ONNX shape inference with the input fixed to `dims`, shape
    computations folded into constants between rounds; only what inference proves counts (the
    file's own value_info and output shapes are dropped)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    graph = fixed.graph
    del graph.value_info[:]
    for output in graph.output:
        output.type.tensor_type.ClearField("shape")
    for value in graph.input:
        if value.name == name:
            value.type.tensor_type.shape.CopyFrom(onnx.TensorShapeProto())
            for size in dims:
                value.type.tensor_type.shape.dim.add().dim_value = size
    outputs = [out for node in graph.node for out in node.output if out]
    known: dict[str, list[int]] = {}
    for _ in range(_FOLD_ROUNDS):
        known = _infer(fixed, dims[0])
        if all(out in known for out in outputs) or not _fold(fixed, known):
            break
    for node in model.graph.node:
        for out in node.output:
            if out and out not in known:
                raise GraphRefused(
                    f"the shape of {out!r} (node {node.name or node.op_type!r}) is not known "
                    "from the batch size alone; served graphs have shapes that do not depend "
                    "on the request's pixels"
                )
    return known


def _infer(model: onnx.ModelProto, batch: int) -> dict[str, list[int]]:
    """The fully known shapes ONNX shape inference proves in `model`, by tensor name."""
    try:
        inferred = onnx.shape_inference.infer_shapes(
            model, check_type=True, strict_mode=True, data_prop=True
        )
    except Exception as exc:  # InferenceError, ValidationError: the graph contradicts itself
        detail = " ".join(str(exc).split())[:200]
        raise GraphRefused(
            f"ONNX shape inference fails at batch {batch} ({detail}); export it again"
        ) from exc
    known: dict[str, list[int]] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        tensor = value.type.tensor_type
        if (
            value.type.HasField("tensor_type")
            and tensor.HasField("shape")
            and all(d.HasField("dim_value") for d in tensor.shape.dim)
        ):
            known[value.name] = [int(d.dim_value) for d in tensor.shape.dim]
    for tensor in model.graph.initializer:
        known[tensor.name] = [int(d) for d in tensor.dims]
    return known


def _fold(model: onnx.ModelProto, known: dict[str, list[int]]) -> bool:
    """Replace the shape computations (`SHAPE_PATH_OPS`) whose inputs are small constants or
    known shapes by their values, as inference alone does not carry every value (ReduceProd);
    whether any was folded."""
    graph = model.graph
    opset = {o.domain or "": int(o.version) for o in model.opset_import}
    values = {
        t.name: numpy_helper.to_array(t)
        for t in graph.initializer
        if math.prod(t.dims) <= _FOLD_ELEMENTS
    }
    kept: list[onnx.NodeProto] = []
    folded: list[TensorProto] = []
    for node in graph.node:
        result: list[Any] | None = None
        inputs = [i for i in node.input if i]
        if node.op_type == "Shape" and node.input[0] in known:
            shape = known[node.input[0]]
            start = _attribute(node, "start", 0)
            end = _attribute(node, "end", len(shape))
            result = [np.array(shape[start:end], np.int64)]
        elif node.op_type in SHAPE_PATH_OPS - {"Shape"} and all(i in values for i in inputs):
            try:
                evaluator = ReferenceEvaluator(node, opsets=opset)
                result = list(evaluator.run(None, {i: values[i] for i in inputs}))
            except Exception:  # not foldable here: inference decides without it
                result = None
        if result is None or any(np.asarray(r).size > _FOLD_ELEMENTS for r in result):
            kept.append(node)
            continue
        for out, value in zip(node.output, result, strict=False):
            if out:
                values[out] = np.asarray(value)
                folded.append(numpy_helper.from_array(np.asarray(value), out))
    if not folded:
        return False
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(folded)
    return True


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return int(attribute.i)
    return default


def _check_growth(name: str, shapes: list[list[int] | None], sizes: list[int]) -> None:
    """Refuse a tensor whose dimensions are not constants or multiples of the batch size, or
    whose elements per image or in all are beyond the bounds."""
    if any(s is None or len(s) != len(shapes[0] or []) for s in shapes):
        raise GraphRefused(f"the rank of {name!r} changes with the batch size")
    first = shapes[0] or []
    growing = 0
    for axis, base in enumerate(first):
        seen = [s[axis] for s in shapes if s is not None]
        if all(v == base for v in seen):
            continue
        if all(v == base * size for v, size in zip(seen, sizes, strict=True)):
            growing += 1
            continue
        shown = ", ".join(f"{v} at batch {size}" for v, size in zip(seen, sizes, strict=True))
        raise GraphRefused(
            f"dimension {axis} of {name!r} is {shown}: neither a constant nor a multiple of "
            "the batch size; served graphs have shapes that depend on the batch size alone"
        )
    if growing > 1:
        raise GraphRefused(
            f"{name!r} grows with the square of the batch size or faster; served graphs grow "
            "linearly with the batch"
        )
    elements = math.prod(first)
    bound = MAX_IMAGE_ELEMENTS if growing else MAX_SHAPE_ELEMENTS
    if elements > bound:
        what = "per image" if growing else "in all"
        raise GraphRefused(
            f"{name!r} holds {elements:,} values {what}, more than {bound:,}; served models "
            "must be small"
        )
