"""The network as ONNX for serving: the convolutions exported by Keras, the BiGRU as one ONNX
`GRU` node.

Keras trains the GRU unrolled (faster on a CPU), and its ONNX export keeps it unrolled: about
750 small nodes (a MatMul, Sigmoid, Tanh, Slice ... per time step and direction), whose
per-node dispatch cost dominated a one-image prediction (0.45 ms of 0.69 ms). ONNX has a
bidirectional GRU operator whose `linear_before_reset=1` form is exactly Keras'
`reset_after=True` cell, gates in the same (z, r, h) order; with it one image takes about a
third of the time, with the same outputs. The grafted graph is checked against Keras on the
caller's sample before it is trusted; any difference beyond float noise falls back to Keras'
own export (`export_onnx` says which it wrote).
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

TOLERANCE = 1e-4
"""Largest difference in any output probability the grafted graph may show against Keras."""
GRU_NODE = "gru-node"
UNROLLED = "unrolled"


def export_onnx(infer: keras.Model, path: Path, sample: np.ndarray) -> str:
    """Write `infer` (image -> probs) to `path`; returns GRU_NODE, or UNROLLED on a fallback."""
    expected = infer.predict(sample, verbose=0)  # also builds a never-called model for export
    try:
        model = _grafted(infer, path.with_suffix(".trunk.onnx"))
        onnx.save(model, str(path))
        difference = _max_difference(path, sample, expected)
        if difference <= TOLERANCE:
            return GRU_NODE
        log.warning("GRU-node export differs from Keras by %.2g; exporting unrolled", difference)
    except (ValueError, KeyError, onnx.checker.ValidationError) as exc:
        log.warning("GRU-node export not possible (%s); exporting unrolled", exc)
    finally:
        path.with_suffix(".trunk.onnx").unlink(missing_ok=True)
    infer.export(str(path), format="onnx", verbose=False)
    return UNROLLED


def _grafted(infer: keras.Model, trunk_path: Path) -> onnx.ModelProto:
    """Keras' export of everything before the BiGRU, then GRU, Dense and Softmax nodes."""
    bigru, logits = infer.get_layer("bigru"), infer.get_layer("logits")
    trunk = keras.Model(infer.input, bigru.input, name="crnn_trunk")
    trunk.predict(np.zeros((1, *infer.input_shape[1:]), np.float32), verbose=0)
    trunk.export(str(trunk_path), format="onnx", verbose=False)
    model = onnx.load(str(trunk_path))
    graph = model.graph
    units = bigru.forward_layer.units
    directions = [_gru_weights(bigru.forward_layer), _gru_weights(bigru.backward_layer)]
    kernel, bias = logits.get_weights()
    weights = {
        "gru_W": np.stack([d[0] for d in directions]),
        "gru_R": np.stack([d[1] for d in directions]),
        "gru_B": np.stack([d[2] for d in directions]),
        "logits_W": kernel,
        "logits_b": bias,
    }
    graph.initializer.extend(
        numpy_helper.from_array(np.asarray(value, np.float32), name)
        for name, value in weights.items()
    )
    graph.initializer.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), "bt_2h"))
    features = graph.output[0].name
    graph.node.extend(
        [
            helper.make_node("Transpose", [features], ["gru_x"], perm=[1, 0, 2]),  # [T, B, F]
            helper.make_node(
                "GRU",
                ["gru_x", "gru_W", "gru_R", "gru_B"],
                ["gru_y"],  # [T, 2, B, U]
                direction="bidirectional",
                hidden_size=units,
                linear_before_reset=1,
            ),
            helper.make_node("Transpose", ["gru_y"], ["gru_bt2u"], perm=[2, 0, 1, 3]),
            helper.make_node("Reshape", ["gru_bt2u", "bt_2h"], ["gru_out"]),  # forward ++ backward
            helper.make_node("MatMul", ["gru_out", "logits_W"], ["logits_mm"]),
            helper.make_node("Add", ["logits_mm", "logits_b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ]
    )
    del graph.output[:]
    steps, classes = infer.output_shape[1], infer.output_shape[2]
    graph.output.append(
        helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", steps, classes])
    )
    onnx.checker.check_model(model)
    return model


def _gru_weights(layer: keras.layers.GRU) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keras GRU weights as ONNX W [3U, F], R [3U, U], B [6U] (both use gate order z, r, h)."""
    if not layer.reset_after or layer.activation.__name__ != "tanh":
        raise ValueError("only reset_after GRUs with tanh map onto ONNX linear_before_reset")
    if layer.recurrent_activation.__name__ != "sigmoid" or not layer.use_bias:
        raise ValueError("only sigmoid-gated GRUs with biases map onto ONNX's GRU")
    kernel, recurrent, bias = layer.get_weights()
    return kernel.T, recurrent.T, bias.reshape(-1)


def _max_difference(path: Path, sample: np.ndarray, expected: np.ndarray) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = session.run(None, {session.get_inputs()[0].name: sample})[0]
    return float(np.abs(ours - expected).max())
