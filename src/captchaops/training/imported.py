"""Models trained outside captchaops: an ONNX CTC network and its declared contract, checked,
scored on the scheme's frozen set and registered like a trained version.

`register_onnx` refuses in one line, before anything is logged, a graph that breaks the
limits, a meta.json that fails its checks, and a contract that does not fit what the network
outputs (its message names the option that would fit, e.g. `pass --blank first`). What it
accepts is logged as a run (the source file's digest, the contract, its frozen-set scores),
logged as the same models-from-code pyfunc as ours, registered through `captchaops.registry`
and staged or rejected by the staging floor, as training does; `promote --auto` then judges it
like any other version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnx
from mlflow import MlflowClient

from captchaops import mlflow_scope
from captchaops.evaluation import report
from captchaops.evaluation.accuracy import character_error_rate, sequence_accuracy
from captchaops.evaluation.evalset import EvalSet, current_digest, ensure_evalset, load_evalset
from captchaops.evaluation.scheme import Scheme
from captchaops.mlflow_scope import pointed_at
from captchaops.model.graph_policy import GraphRefused
from captchaops.model.graph_policy import check_graph as policy
from captchaops.model.pyfunc import log_model
from captchaops.model.reader import ContractError, OnnxReader
from captchaops.model.version import (
    MAX_ONNX_BYTES,
    META_SCHEMA,
    PREPROCESSING,
    VersionError,
    file_sha256,
    parse_meta,
)
from captchaops.registry.errors import one_line_errors
from captchaops.registry.versions import register_version
from captchaops.settings import Settings
from captchaops.stack.promotions_client import ServiceError, pin_evalset, stage_candidate

OPTIONS = {
    "input_layout": "--layout",
    "channels": "--channels",
    "pixel_scaling": "--scaling",
    "output_kind": "--output",
    "output_layout": "--output-layout",
    "blank": "--blank",
}
"""The `captchaops register` option of each contract field (named in refusals)."""
NEAR_ZERO = 0.05
"""A declared contract reading at most this accuracy is compared with its neighbours..."""
CER_GAIN = 0.3
"""...and refused when one of them has a character error rate this much lower."""
DIAGNOSE_IMAGES = 256


class RegisterError(Exception):
    """A network or contract that cannot be registered; the message is one line with the fix."""


@dataclass(frozen=True)
class Registered:
    """What `register_onnx` did."""

    version: str
    run_id: str
    metrics: dict[str, float]
    staged: bool
    rejection_reason: str | None
    report_uri: str = ""


def check_graph(path: Path) -> list[str]:
    """The sorted operators of the ONNX file at `path`; RegisterError unless it is one flat,
    self-contained graph within the size limits that every served version meets
    (`model.graph_policy`: the same operator allow-list, tensor and output bounds)."""
    if not path.is_file():
        raise RegisterError(f"{path} is not a file; pass the exported .onnx file")
    if path.stat().st_size > MAX_ONNX_BYTES:
        raise RegisterError(
            f"{path.name} is over {MAX_ONNX_BYTES // 2**20} MiB; export a smaller model"
        )
    try:
        return policy(path)
    except GraphRefused as exc:
        raise RegisterError(str(exc)) from exc
    except Exception as exc:  # protobuf's DecodeError is no OSError
        raise RegisterError(f"{path.name} is not an ONNX model ({exc}); export it again") from exc


def graph_geometry(path: Path, layout: str) -> dict[str, int]:
    """Height, width and channels the graph's input fixes under `layout` (those it leaves open
    are missing); RegisterError when only the other layout makes sense of them."""
    graph = onnx.load(str(path), load_external_data=False).graph
    dims = [d.dim_value or None for d in graph.input[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        return {}
    read = {"NHWC": (dims[3], dims[1], dims[2]), "NCHW": (dims[1], dims[2], dims[3])}
    other = "NCHW" if layout == "NHWC" else "NHWC"
    if read[layout][0] not in (None, 1, 3) and read[other][0] in (1, 3):
        shown = ", ".join("?" if d is None else str(d) for d in dims)
        raise RegisterError(
            f"the network's input is [{shown}], which is {other}; pass --layout {other}"
        )
    c, h, w = read[layout]
    return {k: v for k, v in (("height", h), ("width", w), ("channels", c)) if v is not None}


def _frozen(client: MlflowClient, settings: Settings, fields: dict[str, Any]) -> EvalSet:
    digest = current_digest(client, settings)
    if digest:
        return load_evalset(client, digest)
    if "min_length" not in fields:
        raise RegisterError(
            f"{settings.model_name} has no frozen evaluation set yet; pass --length MIN-MAX "
            "(or make one first with `captchaops evalset`)"
        )
    scheme = Scheme(fields["alphabet"], fields["min_length"], fields["max_length"])
    made = ensure_evalset(client, settings, scheme=scheme)
    try:
        pin_evalset(settings, made)  # by the promotion service, where one signs
    except ServiceError as exc:
        raise RegisterError(str(exc)) from exc
    return made


def prepare(
    client: MlflowClient, settings: Settings, onnx_path: Path, fields: dict[str, Any]
) -> tuple[dict[str, Any], EvalSet]:
    """The checked meta.json for the network and the frozen set it is judged on."""
    if not fields.get("alphabet"):
        raise RegisterError("pass --alphabet (the characters in the network's class order)")
    fields = graph_geometry(onnx_path, fields.get("input_layout", "NHWC")) | fields
    for name in ("height", "width"):
        if name not in fields:
            raise RegisterError(f"the graph's input leaves the {name} open; pass --{name}")
    evalset = _frozen(client, settings, fields)
    lengths = [len(label) for label in evalset.labels]
    fields = {"min_length": min(lengths), "max_length": max(lengths)} | fields
    meta = {
        "schema_version": META_SCHEMA,
        "preprocessing": PREPROCESSING,
        "onnx_sha256": file_sha256(onnx_path),
        "dataset_sha256": "",
        "scheme": settings.model_name,
        "data_kind": evalset.kind,
        "model_format": "onnx",
    } | fields
    try:
        checked = parse_meta(json.dumps(meta).encode()).model_dump()
    except VersionError as exc:
        raise RegisterError(str(exc)) from exc
    unreadable = "".join(sorted(set(evalset.alphabet()) - set(checked["alphabet"])))
    if unreadable:
        raise RegisterError(
            f"{settings.model_name}'s frozen evaluation set has characters {unreadable!r} the "
            "alphabet lacks; pass the network's whole --alphabet or register under another "
            "--model-name"
        )
    return checked, evalset


def _fix(exc: ContractError) -> str:
    hint = ", ".join(f"{OPTIONS[k]} {v}" for k, v in exc.fix.items() if k in OPTIONS)
    return f"{exc}; pass {hint}" if hint else f"{exc}; export the model to fit its contract"


def _open(onnx_path: Path, meta: dict[str, Any]) -> OnnxReader:
    try:
        return OnnxReader(onnx_path, meta)
    except ContractError as exc:
        raise RegisterError(_fix(exc)) from exc
    except Exception as exc:  # onnxruntime raises its own types for a malformed graph
        raise RegisterError(
            f"ONNX Runtime cannot open the network ({' '.join(str(exc).split())[:200]})"
        ) from exc


def _read(reader: OnnxReader, images: list[bytes], labels: list[str]) -> tuple[float, float]:
    texts = [o["text"] for o in reader.read_all(images, chunk=64)]
    return sequence_accuracy(texts, labels), character_error_rate(texts, labels)


def _neighbours(contract: dict[str, Any]) -> list[tuple[str, Any]]:
    """Contracts one field away that a misdeclared export often has."""
    swap = {"first": "last", "last": "first", "BTC": "TBC", "TBC": "BTC"}
    scalings = [s for s in ("0..1", "-1..1") if s != contract["pixel_scaling"]]
    return [
        ("blank", swap[contract["blank"]]),
        ("output_layout", swap[contract["output_layout"]]),
        *(("pixel_scaling", s) for s in scalings),
    ]


def _hint(field: str, value: Any) -> str:
    if field == "blank":
        where = "index 0" if value == "first" else "the last index"
        return f"the blank looks like {where}; pass --blank {value}"
    return f"the network reads far better with {field} {value}; pass {OPTIONS[field]} {value}"


def diagnose(onnx_path: Path, meta: dict[str, Any], evalset: EvalSet) -> OnnxReader:
    """The network opened under its contract; RegisterError naming the fix when the contract
    does not fit its outputs."""
    reader = _open(onnx_path, meta)
    images, labels = evalset.images[:DIAGNOSE_IMAGES], evalset.labels[:DIAGNOSE_IMAGES]
    try:
        raw = reader.outputs(reader.tensor(images[:5]), probabilities=False)
    except ContractError as exc:
        raise RegisterError(_fix(exc)) from exc
    sums = raw.sum(axis=2)
    probabilities = raw.min() >= -1e-4 and raw.max() <= 1 + 1e-4 and np.abs(sums - 1).max() < 1e-2
    if meta["output_kind"] == "probabilities" and not probabilities:
        raise RegisterError(
            f"the network's outputs are not probabilities (values {raw.min():.2f} to "
            f"{raw.max():.2f}); pass --output logits"
        )
    if meta["output_kind"] == "logits" and probabilities:
        raise RegisterError(
            "the network's outputs are already probabilities; pass --output probabilities"
        )
    accuracy, cer = _read(reader, images, labels)
    if accuracy > NEAR_ZERO:
        return reader
    for field, value in _neighbours(reader.contract):
        try:
            other = OnnxReader(onnx_path, meta | {field: value})
            their_accuracy, their_cer = _read(other, images, labels)
        except ContractError:
            continue
        if their_accuracy >= accuracy and their_cer <= cer - CER_GAIN:
            raise RegisterError(
                f"{_hint(field, value)} (it reads {accuracy:.0%} of the frozen set, CER "
                f"{cer:.2f}, as declared; {their_accuracy:.0%}, CER {their_cer:.2f}, with "
                f"{field} {value})"
            )
    return reader


def register_onnx(
    settings: Settings, onnx_path: Path, fields: dict[str, Any], actor: str | None = None
) -> Registered:
    """Check, score and register an ONNX CTC network trained elsewhere, then stage or reject
    it by the staging floor; RegisterError (nothing logged) when it cannot be."""
    ops = check_graph(onnx_path)
    with one_line_errors(settings):
        client = mlflow_scope.client(settings)
        meta, evalset = prepare(client, settings, onnx_path, fields)
    reader = diagnose(onnx_path, meta, evalset)
    try:
        outputs = reader.read_all(evalset.images, chunk=64)
    except ContractError as exc:
        raise RegisterError(_fix(exc)) from exc
    texts = [o["text"] for o in outputs]
    metrics = {
        "test_seq_acc": sequence_accuracy(texts, evalset.labels),
        "test_cer": character_error_rate(texts, evalset.labels),
        "test_mean_confidence": float(np.mean([o["confidence"] for o in outputs])),
    }
    contract = {k: json.dumps(v) if isinstance(v, list) else v for k, v in reader.contract.items()}
    with pointed_at(settings), one_line_errors(settings):
        mlflow.set_experiment(settings.experiment_name)
        with mlflow.start_run(run_name=f"register {onnx_path.name}"[:200]) as run:
            mlflow.log_params(
                contract
                | {
                    "origin": "external",
                    "source_file": onnx_path.name[:200],
                    "source_sha256": meta["onnx_sha256"],
                    "onnx_ops": " ".join(ops)[:500],
                    "alphabet": meta["alphabet"],
                    "num_classes": len(meta["alphabet"]) + 1,
                    "min_length": meta["min_length"],
                    "max_length": meta["max_length"],
                    "height": meta["height"],
                    "width": meta["width"],
                    "data_kind": meta["data_kind"],
                    "scheme": settings.model_name,
                    "n_test": len(evalset),
                    "test_set": "frozen held-out set",
                    "frozen_evalset_digest": evalset.digest,
                }
            )
            mlflow.log_metrics(metrics)
            mlflow.set_tag(
                "mlflow.note.content",
                f"ONNX network registered from `{onnx_path.name}` (sha256 "
                f"{meta['onnx_sha256'][:12]}), frozen-set accuracy {metrics['test_seq_acc']:.4f}.",
            )
            info = log_model(onnx_path, meta, evalset.images[0])
            version = register_version(client, settings.model_name, info.model_uri, run.info.run_id)
            try:  # by the promotion service where one signs for the stack
                reason = stage_candidate(
                    client, settings, version, metrics["test_seq_acc"], actor=actor
                )
            except ServiceError as exc:
                raise RegisterError(
                    f"v{version} of {settings.model_name} is registered but not staged: {exc}"
                ) from exc
            found = report.build(
                evalset.labels,
                outputs,
                model_name=settings.model_name,
                version=version,
                evalset_digest=evalset.digest,
            )
            report.log_report(client, run.info.run_id, found, evalset.images)
    where = f"{run.info.artifact_uri.rstrip('/')}/{report.FOLDER}"
    return Registered(version, run.info.run_id, metrics, reason is None, reason, where)
