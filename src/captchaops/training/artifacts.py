"""What a training run leaves in MLflow besides metrics: the exported version, its test
scores, the data set, sample predictions and a note for the run page."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.pandas_dataset import from_pandas
from PIL import Image

from captchaops.data.dataset import LabelledImages
from captchaops.evaluation import report
from captchaops.evaluation.accuracy import character_error_rate, confusions, sequence_accuracy
from captchaops.model.graph_policy import op_set
from captchaops.model.onnx_export import export_onnx
from captchaops.model.preprocess import preprocess
from captchaops.model.pyfunc import log_model
from captchaops.model.reader import OnnxReader
from captchaops.model.version import file_sha256


def export_and_test(
    client: MlflowClient,
    infer: keras.Model,
    meta: dict[str, Any],
    test_images: list[bytes],
    test_labels: list[str],
    tmp: Path,
) -> tuple[str, dict[str, float]]:
    """Export ONNX, score it as a server would on the test images and log it all (the model
    unregistered); returns (the logged model's URI, test metrics)."""
    onnx_path = tmp / "crnn.onnx"
    sample = np.stack(
        [preprocess(data, meta["height"], meta["width"]) for data in test_images[:16]]
    )
    mlflow.log_param("onnx_rnn", export_onnx(infer, onnx_path, sample))
    keras_path = tmp / "crnn.keras"
    infer.save(keras_path)
    mlflow.log_artifact(str(keras_path), "keras")
    return test_and_log(client, onnx_path, meta, test_images, test_labels)


def test_and_log(
    client: MlflowClient,
    onnx_path: Path,
    meta: dict[str, Any],
    test_images: list[bytes],
    test_labels: list[str],
) -> tuple[str, dict[str, float]]:
    """Score an exported ONNX network as a server would, log the scores, samples, its visual
    report and the servable model (unregistered: `registry.register_version` registers it);
    returns (the logged model's URI, test metrics)."""
    ops = op_set(onnx_path)
    mlflow.log_param("onnx_ops", ",".join(ops))
    meta = meta | {"onnx_sha256": file_sha256(onnx_path), "onnx_ops": ops}
    served = OnnxReader(onnx_path, meta)
    outputs = served.read_all(test_images)
    pred = [o["text"] for o in outputs]
    metrics = {
        "test_seq_acc": sequence_accuracy(pred, test_labels),
        "test_cer": character_error_rate(pred, test_labels),
        "test_mean_confidence": float(np.mean([o["confidence"] for o in outputs])),
    }
    mlflow.log_metrics(metrics)
    top = confusions(pred, test_labels, top=15)
    mlflow.log_dict(
        {"confusions": [{"true": t, "pred": p, "count": n} for t, p, n in top]}, "confusions.json"
    )
    mlflow.log_figure(
        _sample_figure(test_images[:16], test_labels[:16], pred[:16]), "test_samples.png"
    )
    mlflow.set_tag("mlflow.note.content", _note(meta, metrics, top))
    run = mlflow.active_run()
    assert run is not None  # export_and_test runs inside the training run
    found = report.build(test_labels, outputs)
    report.log_report(client, run.info.run_id, found, test_images)
    info = log_model(onnx_path, meta, test_images[0])
    return str(info.model_uri), metrics


def log_dataset(data: LabelledImages, splits: dict[str, list[int]], digest: str) -> None:
    """The training data as an MLflow dataset input: every name, label and split."""
    split_of = {i: name for name, idx in splits.items() for i in idx}
    frame = pd.DataFrame(
        {"name": data.names, "label": data.labels, "split": [split_of[i] for i in range(len(data))]}
    )
    dataset = from_pandas(
        frame,
        source=CodeDatasetSource({"data_source": data.source, "sha256": digest}),
        targets="label",
        name=data.source.split(" + ")[0].rsplit("/", 1)[-1] or "dataset",
        digest=digest[:32],
    )
    mlflow.log_input(dataset, context="training")


def _sample_figure(images: list[bytes], true: list[str], pred: list[str]) -> Any:
    """The test samples with their readings: a bare `Figure` (no pyplot, so no global figure
    registry or interactive backend; nothing to close, it is freed with its last reference)."""
    cols = 4
    rows = max(1, math.ceil(len(images) / cols))
    fig = Figure(figsize=(cols * 2.6, rows * 1.3))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, data, t, p in zip(np.ravel(axes), images, true, pred, strict=False):
        ax.imshow(Image.open(io.BytesIO(data)).convert("RGB"))
        ax.set_title(f"true {t} / pred {p}", fontsize=8, color="green" if t == p else "red")
    fig.tight_layout()
    return fig


def _note(meta: dict[str, Any], metrics: dict[str, float], top: list[tuple[str, str, int]]) -> str:
    confused = ", ".join(f"{t}->{p} ({n})" for t, p, n in top[:5]) or "none"
    return (
        f"CRNN+CTC on {meta['height']}x{meta['width']} grayscale, alphabet `{meta['alphabet']}`.\n\n"
        f"Test sequence accuracy **{metrics['test_seq_acc']:.4f}**, CER {metrics['test_cer']:.4f}.\n\n"
        f"Most confused (true->pred): {confused}."
    )
