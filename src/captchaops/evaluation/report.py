"""A version's visual report: how it reads a labelled held-out set, beyond accuracy and CER.

`build` computes the numbers (numpy only): the character confusion matrix, accuracy and CER
by label length, a reliability table (confidence against accuracy, and the expected
calibration error) and the worst-read images. `log` writes them to the version's own run
under `report/`: `report.json` always, and the four PNGs where matplotlib is installed (the
`train` extra; model servers never import this module). The gate logs one for every version
it scores, `train` and `register` one for the version they make, so two versions' reports sit
side by side in the MLflow UI (the same files under each version's run).
"""

from __future__ import annotations

import io
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from mlflow import MlflowClient

from captchaops.evaluation.accuracy import aligned_pairs, character_error_rate, sequence_accuracy

FOLDER = "report"
JSON_FILE = "report.json"
PNG_FILES = ("confusion_matrix.png", "worst_read.png", "accuracy_by_length.png", "reliability.png")
BINS = 10
WORST = 16
GAP = "∅"
"""The confusion matrix's row and column for a character missing on one side (an insertion
or deletion)."""


def build(labels: list[str], outputs: list[dict[str, Any]], **about: Any) -> dict[str, Any]:
    """The report's numbers for `outputs` ({"text", "confidence"}) read from images with `labels`."""
    texts = [str(o["text"]) for o in outputs]
    confidences = np.array([float(o["confidence"]) for o in outputs], dtype=np.float64)
    right = np.array([t == label for t, label in zip(texts, labels, strict=True)])
    pairs: Counter[tuple[str, str]] = Counter()
    per_image = []
    for text, label in zip(texts, labels, strict=True):
        aligned = aligned_pairs(text, label)
        pairs.update((t or GAP, p or GAP) for t, p in aligned)
        per_image.append(sum(t != p for t, p in aligned) / max(len(label), 1))
    chars = [*sorted({c for pair in pairs for c in pair} - {GAP}), GAP]
    matrix = [[pairs.get((t, p), 0) for p in chars] for t in chars]
    by_length = {}
    for length in sorted({len(label) for label in labels}):
        idx = [i for i, label in enumerate(labels) if len(label) == length]
        by_length[str(length)] = {
            "n": len(idx),
            "accuracy": float(right[idx].mean()),
            "cer": character_error_rate([texts[i] for i in idx], [labels[i] for i in idx]),
        }
    edges = np.linspace(0.0, 1.0, BINS + 1)
    which = np.clip(np.digitize(confidences, edges[1:-1]), 0, BINS - 1)
    reliability: list[dict[str, Any]] = []
    ece = 0.0
    for b in range(BINS):
        inside = which == b
        n = int(inside.sum())
        mean_confidence = float(confidences[inside].mean()) if n else None
        accuracy = float(right[inside].mean()) if n else None
        if mean_confidence is not None and accuracy is not None:
            ece += n / len(labels) * abs(mean_confidence - accuracy)
        reliability.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "n": n,
                "confidence": mean_confidence,
                "accuracy": accuracy,
            }
        )
    order = sorted(range(len(labels)), key=lambda i: (-per_image[i], -confidences[i]))
    worst = [
        {"index": i, "label": labels[i], "text": texts[i], "confidence": float(confidences[i])}
        for i in order
        if not right[i]
    ][:WORST]
    substitutions = Counter(
        {(t, p): n for (t, p), n in pairs.items() if t != p and GAP not in (t, p)}
    )
    return about | {
        "n": len(labels),
        "seq_acc": sequence_accuracy(texts, labels),
        "cer": character_error_rate(texts, labels),
        "mean_confidence": float(confidences.mean()) if len(labels) else 0.0,
        "expected_calibration_error": float(ece),
        "by_length": by_length,
        "reliability": reliability,
        "confusion_matrix": {"characters": chars, "counts": matrix},
        "top_confusions": [
            {"true": t, "pred": p, "count": n} for (t, p), n in substitutions.most_common(15)
        ],
        "worst": worst,
    }


def render(report: dict[str, Any], images: list[bytes]) -> dict[str, bytes]:
    """The report's four PNGs by file name; empty when matplotlib is not installed."""
    try:
        import matplotlib  # here, not at the top: the train extra's, optional here
    except ImportError:
        return {}
    matplotlib.use("Agg")
    # here, not at the top: it imports matplotlib, the train extra's, and must follow use("Agg")
    from captchaops.evaluation import report_figures

    figures = report_figures.figures(report, images)
    pngs = {}
    for name, figure in figures.items():
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        report_figures.close(figure)
        pngs[name] = buffer.getvalue()
    return pngs


def log_report(
    client: MlflowClient, run_id: str, report: dict[str, Any], images: list[bytes]
) -> list[str]:
    """Write the report (JSON, and PNGs where matplotlib is) under `report/` of the run;
    returns the files written."""
    files = {JSON_FILE: json.dumps(report, indent=1, ensure_ascii=False).encode()}
    files |= render(report, images)
    with tempfile.TemporaryDirectory(prefix="captchaops-report-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        client.log_artifacts(run_id, tmp, FOLDER)
    return sorted(files)


def has_report(client: MlflowClient, run_id: str, digest: str) -> bool:
    """Whether the run already holds a report on the frozen set with this digest."""
    if not any(f.path.endswith(JSON_FILE) for f in client.list_artifacts(run_id, FOLDER)):
        return False
    with tempfile.TemporaryDirectory(prefix="captchaops-report-") as tmp:
        local = client.download_artifacts(run_id, f"{FOLDER}/{JSON_FILE}", tmp)
        try:
            return bool(json.loads(Path(local).read_text()).get("evalset_digest") == digest)
        except ValueError:
            return False


def ui_url(public_tracking_url: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of a run's `report/` artifacts."""
    exp, run = quote(str(experiment_id), safe=""), quote(str(run_id), safe="")
    return f"{public_tracking_url.rstrip('/')}/#/experiments/{exp}/runs/{run}/artifactPath/{FOLDER}"


def log_for_version(
    client: MlflowClient,
    model_name: str,
    version: str,
    labels: list[str],
    images: list[bytes],
    outputs: list[dict[str, Any]],
    digest: str = "",
) -> str | None:
    """Log the report of `version`'s readings to its run (unless it holds one on the frozen set
    `digest` already); returns the run id, or None when the version has no run."""
    run_id = client.get_model_version(model_name, version).run_id
    if not run_id or (digest and has_report(client, run_id, digest)):
        return run_id or None
    report = build(labels, outputs, model_name=model_name, version=version, evalset_digest=digest)
    log_report(client, run_id, report, images)
    return run_id


def locate(
    client: MlflowClient, public_tracking_url: str, model_name: str, version: str
) -> dict[str, Any]:
    """Where a version's report is: run id, artifact URI, MLflow UI link, and its numbers when
    the run holds one (`report` is None otherwise)."""
    run_id = client.get_model_version(model_name, version).run_id
    if not run_id:
        return {"run_id": None, "artifact_uri": None, "ui_url": None, "report": None}
    run = client.get_run(run_id)
    found: dict[str, Any] | None = None
    if any(f.path.endswith(JSON_FILE) for f in client.list_artifacts(run_id, FOLDER)):
        with tempfile.TemporaryDirectory(prefix="captchaops-report-") as tmp:
            local = client.download_artifacts(run_id, f"{FOLDER}/{JSON_FILE}", tmp)
            found = json.loads(Path(local).read_text())
    return {
        "run_id": run_id,
        "artifact_uri": f"{run.info.artifact_uri.rstrip('/')}/{FOLDER}",
        "ui_url": ui_url(public_tracking_url, run.info.experiment_id, run_id),
        "report": found,
    }
