"""Which ONNX graphs a version may carry: allowed operators, bounded tensors, no subgraphs.

A registered version's graph is data from whoever can write to the registry. The file checks
(size, digest) cannot tell a CRNN from a `ConstantOfShape` that allocates gigabytes or a `Loop`
that never ends, so the graph is read (never run) and refused unless every node is an operator
our exporter emits, every constant tensor and every constant shape is bounded and nothing nests
a subgraph. Running it is then tried in a limited child process (`captchaops.serving.trial`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import onnx
from onnx import AttributeProto, TensorProto

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
networks trained elsewhere enter through `captchaops register` (`training/external.py`)."""
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
_SHAPE_INPUTS = {"Reshape": 1, "Expand": 1}


class GraphRefused(ValueError):
    """A graph that breaks the policy; the message is one line saying what and how to fix it."""


def op_set(path: Path) -> list[str]:
    """The sorted operator types of the ONNX graph at `path` (recorded with each version)."""
    return sorted({node.op_type for node in _load(path).graph.node})


def check_graph(path: Path, allowed: Iterable[str] | None = None) -> list[str]:
    """Refuse the graph at `path` unless it follows the policy; returns its sorted op set."""
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
