"""`train --members K`: K members (seeds seed..seed+K-1) trained as Ray tasks and registered as
one version that reads like one model.

The members' ONNX graphs are merged into one graph with one input and K outputs; meta.json says
`members: K` and the combination rule, and the one inference path (`model/reader.py`) decodes
each output and combines the answers, so our servers and stock `mlflow models serve` answer
alike. The rule (the most confident member, or a confidence-weighted vote over the decoded
strings) is chosen per version by measurement on the validation split, both scores logged.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import onnx

from captchaops import mlflow_scope
from captchaops.evaluation.accuracy import sequence_accuracy
from captchaops.model.crnn import build_crnn
from captchaops.model.onnx_export import export_onnx
from captchaops.model.preprocess import preprocess
from captchaops.model.reader import RULES, OnnxReader, better_rule
from captchaops.model.version import META_SCHEMA, PREPROCESSING
from captchaops.registry.versions import register_version
from captchaops.scaleout.board import Board
from captchaops.scaleout.engine import checked, cpus_per_run, ray_session
from captchaops.scaleout.runner import Failure, ParentRun, parent_run, run_jobs
from captchaops.scaleout.sweep import base_job, prepare
from captchaops.scaleout.work import Job, Outcome
from captchaops.settings import Settings
from captchaops.stack.promotions_client import ServiceError, stage_candidate
from captchaops.training import TrainError
from captchaops.training.artifacts import test_and_log
from captchaops.training.config import TrainConfig
from captchaops.training.prepare import FixedSplit


def merge_members(models: list[onnx.ModelProto]) -> onnx.ModelProto:
    """One graph: the members side by side on one shared input, one output per member."""
    first = models[0]
    shared = first.graph.input[0]
    nodes, initializers, outputs, infos = [], [], [], []
    for i, model in enumerate(models):
        prefixed = onnx.compose.add_prefix(model, f"member{i}/")
        own_input = prefixed.graph.input[0].name
        for node in prefixed.graph.node:
            for j, name in enumerate(node.input):
                if name == own_input:
                    node.input[j] = shared.name
            nodes.append(node)
        initializers += list(prefixed.graph.initializer)
        outputs += list(prefixed.graph.output)
        infos += list(prefixed.graph.value_info)
    graph = onnx.helper.make_graph(
        nodes, "ensemble", [shared], outputs, initializers, value_info=infos
    )
    merged = onnx.helper.make_model(
        graph, opset_imports=list(first.opset_import), ir_version=first.ir_version
    )
    onnx.checker.check_model(merged)
    return merged


def train_members(
    config: TrainConfig,
    settings: Settings,
    members: int,
    cluster: str | None,
    board: Board,
    gpus: float = 0.0,
) -> tuple[str, str, dict[str, float], str | None, str]:
    """Train `members` networks on Ray (each with `gpus` GPUs) and register them as one
    version; returns (run id, version, test metrics, rejection reason or None, combination
    rule)."""
    if not 2 <= members <= 16:
        raise TrainError(f"--members {members} is out of range; use 2 to 16 (or leave it out)")
    start = time.monotonic()
    p = prepare(config, settings)
    source = config.data_dir.name if config.data_dir else "synthetic"
    params = config.params() | p.arch.params() | {"members": members, "alphabet": p.alphabet}
    params |= {"gpus_per_trial": gpus} if gpus else {}
    with parent_run(settings, f"{source}-{members}members", "ensemble", params) as parent:
        return _train(config, settings, p, parent, (members, gpus), cluster, board, start)


def _train(
    config: TrainConfig,
    settings: Settings,
    p: FixedSplit,
    parent: ParentRun,
    asked: tuple[int, float],
    cluster: str | None,
    board: Board,
    start: float,
) -> tuple[str, str, dict[str, float], str | None, str]:
    """The members as Ray tasks (`asked`: how many, GPUs each), merged, scored, registered and
    staged."""
    client, parent_id = parent.client, parent.run_id
    members, gpus = asked
    lengths = [len(label) for label in p.data.labels]
    base = replace(base_job("member", p, config, settings, parent), keep_weights=True)
    jobs = []
    for i in range(members):
        child = parent.child(f"member {i + 1}", "ensemble-member")
        seeded = replace(config, seed=config.seed + i)
        jobs.append(replace(base, name=f"member {i + 1}", config=seeded, run_id=child))
    with ray_session(cluster, home=settings.home_dir) as engine:
        checked(engine, parent, base.tracking_uri, gpus)
        board.dashboard_url = engine.dashboard_url
        results = run_jobs(jobs, cpus_per_run(engine, members), board, client, gpus=gpus)
    failed = [r for r in results.values() if isinstance(r, Failure)]
    for job in jobs:
        assert job.run_id is not None
        ok = isinstance(results.get(job.name), Outcome)
        mlflow_scope.finish_run(client, job.run_id, "FINISHED" if ok else "FAILED")
    if failed:
        raise TrainError(f"{failed[0].name} failed ({failed[0].reason}); run train again")
    outcomes = [r for r in results.values() if isinstance(r, Outcome)]
    if p.frozen is not None:
        test = (p.frozen.images, p.frozen.labels)
    else:
        test = (
            [p.data.images[i] for i in p.splits["test"]],
            [p.data.labels[i] for i in p.splits["test"]],
        )
    meta = {
        "schema_version": META_SCHEMA,
        "alphabet": p.alphabet,
        "height": p.arch.height,
        "width": p.arch.width,
        "min_length": min(lengths),
        "max_length": max(lengths),
        "preprocessing": PREPROCESSING,
        "dataset_sha256": p.data.digest(),
        "scheme": settings.model_name,
        "data_kind": "folder" if config.data_dir is not None else "synthetic",
        "model_format": "onnx",
        "members": members,
    }
    val = ([p.data.images[i] for i in p.splits["val"]], [p.data.labels[i] for i in p.splits["val"]])
    with (
        mlflow_scope.pointed_at(settings),
        mlflow.start_run(run_id=parent_id),
        tempfile.TemporaryDirectory() as tmp,
    ):
        path = _merged(outcomes, base, Path(tmp), test[0][:16])
        scores = _rule_scores(path, meta | {"onnx_sha256": "0" * 64}, val)
        rule = better_rule(scores)
        mlflow.log_metrics({f"val_seq_acc_{r}": v for r, v in scores.items()})
        mlflow.log_param("combine", rule)
        client = mlflow_scope.client(settings)
        model_uri, metrics = test_and_log(client, path, meta | {"combine": rule}, test[0], test[1])
        version = register_version(client, settings.model_name, model_uri, parent_id)
        mlflow.log_metric("wall_seconds", time.monotonic() - start)
    try:  # by the promotion service, where one signs for the stack
        reason = stage_candidate(client, settings, version, metrics["test_seq_acc"])
    except ServiceError as exc:
        raise TrainError(f"v{version} was registered but not staged: {exc}") from exc
    return parent_id, version, metrics, reason, rule


def _merged(outcomes: list[Outcome], job: Job, tmp: Path, sample_images: list[bytes]) -> Path:
    """Export each member to ONNX (checked against Keras) and merge them into one file."""
    sample = np.stack([preprocess(b, job.arch.height, job.arch.width) for b in sample_images])
    models = []
    for i, outcome in enumerate(sorted(outcomes, key=lambda o: o.name)):
        _, infer = build_crnn(job.arch, len(job.alphabet) + 1)
        assert outcome.weights is not None
        infer.set_weights(outcome.weights)
        member = tmp / f"member{i}.onnx"
        export_onnx(infer, member, sample)
        models.append(onnx.load(str(member)))
    path = tmp / "crnn.onnx"
    onnx.save(merge_members(models), str(path))
    return path


def _rule_scores(
    path: Path, meta: dict[str, object], val: tuple[list[bytes], list[str]]
) -> dict[str, float]:
    """Validation sequence accuracy of the ensemble under each combination rule."""
    scores = {}
    for rule in RULES:
        reader = OnnxReader(path, meta | {"combine": rule})
        texts = [o["text"] for o in reader.read_all(val[0])]
        scores[rule] = sequence_accuracy(texts, val[1])
    return scores
