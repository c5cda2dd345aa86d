"""The served ONNX graph: the BiGRU as one ONNX GRU node, with Keras' own outputs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from captchaops.model import graph_policy
from captchaops.model.crnn import Architecture, build_crnn
from captchaops.model.onnx_export import GRU_NODE, UNROLLED, export_onnx


@pytest.fixture(scope="module")
def network() -> object:
    """A small CRNN with random (not initial) weights, so every gate matters; seeded, so the
    test does not depend on which tests ran before it in the process."""
    import keras

    keras.utils.set_random_seed(0)
    _, infer = build_crnn(Architecture(height=32, width=64, filters=(8, 8, 8, 8), rnn_units=8), 5)
    rng = np.random.default_rng(0)
    infer.set_weights(
        [w + rng.normal(0, 0.3, w.shape).astype(w.dtype) for w in infer.get_weights()]
    )
    return infer


def test_the_bigru_is_one_gru_node_with_keras_outputs(network: object, tmp_path: Path) -> None:
    images = np.random.default_rng(1).random((6, 32, 64, 1), dtype=np.float32)
    path = tmp_path / "crnn.onnx"

    assert export_onnx(network, path, images[:2]) == GRU_NODE  # type: ignore[arg-type]

    ops = Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    assert ops["GRU"] == 1
    assert ops["Sigmoid"] == ops["Tanh"] == 0  # nothing unrolled is left
    assert set(ops) <= graph_policy.GRU_NODE_OPS, "the exporter emits an operator not allowed"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    served = session.run(None, {session.get_inputs()[0].name: images})[0]
    keras_probs = network.predict(images, verbose=0)  # type: ignore[attr-defined]
    np.testing.assert_allclose(served, keras_probs, atol=1e-5)
    assert served.shape == (6, 16, 5)
    # every direction and gate shows: the most likely path differs between images
    assert len({tuple(p) for p in served.argmax(axis=2)}) > 1


def test_a_one_image_batch_has_the_same_answer_as_in_a_larger_batch(
    network: object, tmp_path: Path
) -> None:
    images = np.random.default_rng(2).random((3, 32, 64, 1), dtype=np.float32)
    path = tmp_path / "crnn.onnx"
    export_onnx(network, path, images)  # type: ignore[arg-type]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    together = session.run(None, {feed: images})[0]
    alone = np.concatenate([session.run(None, {feed: images[i : i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(alone, together, atol=1e-6)


def test_a_network_without_the_bigru_is_exported_as_keras_exports_it(tmp_path: Path) -> None:
    import keras

    image = keras.Input(shape=(8, 16, 1), name="image")
    x = keras.layers.Reshape((16, 8))(keras.layers.Permute((2, 1, 3))(image))
    probs = keras.layers.Softmax()(keras.layers.Dense(4)(x))
    other = keras.Model(image, probs)
    sample = np.random.default_rng(3).random((2, 8, 16, 1), dtype=np.float32)
    path = tmp_path / "other.onnx"

    assert export_onnx(other, path, sample) == UNROLLED
    assert set(graph_policy.op_set(path)) <= graph_policy.ALLOWED_OPS

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    served = session.run(None, {session.get_inputs()[0].name: sample})[0]
    np.testing.assert_allclose(served, other.predict(sample, verbose=0), atol=1e-5)
    assert not list(tmp_path.glob("*.trunk.onnx"))
