"""The audit trail: one MLflow run per alias decision, in the promotions experiment."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Protocol

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException

from captchaops.mlflow_scope import client, experiment_id, finish_run
from captchaops.registry.errors import one_line_errors
from captchaops.registry.names import PRODUCTION, now
from captchaops.settings import Settings

AUDIT_EXPERIMENT = "text-captcha-promotions"
MOVES = ("promoted", "rolled-back")
"""Decisions that moved @production (a rejection or a staging move does not)."""


class Scored(Protocol):
    """What an audit record keeps of a version's score on the frozen set (`evaluation`'s
    `Score` is one); the registry stores scores and never makes them."""

    @property
    def digest(self) -> str:
        """The frozen set's digest."""

    @property
    def error(self) -> str | None:
        """Why the version failed to load or predict; None when it did not."""

    def metrics(self, prefix: str) -> dict[str, float]:
        """The numbers as MLflow metrics named `<prefix>_<metric>` (empty when it failed)."""


@dataclass(frozen=True)
class Move:
    """One audited alias decision: a promotion, a rollback, a staging or a rejection."""

    alias: str
    from_version: str | None
    to_version: str
    actor: str
    reason: str
    kind: str
    decision: str
    at: str
    run_id: str
    seq: int
    approver: str = ""
    """The second account that approved a production move ("" when none was asked)."""

    def line(self) -> str:
        """The move as one human line."""
        source = f"v{self.from_version}" if self.from_version else "nothing"
        target = f"v{self.to_version}" if self.to_version else "nothing"
        approved = ""
        if self.approver:
            how = "on approval by" if self.decision == "rejected" else "approved by"
            approved = f", {how} {self.approver}"
        return (
            f"@{self.alias} {source} -> {target} ({self.decision}) by {self.actor}{approved} "
            f"at {self.at}: {self.reason}"
        )


def audit_experiment(mlflow_client: MlflowClient) -> str:
    """The id of the promotions experiment, created on first use."""
    return experiment_id(mlflow_client, AUDIT_EXPERIMENT, {"kind": "promotion"})


def _move_of(run: Run) -> Move:
    params, tags = run.data.params, run.data.tags
    return Move(
        alias=tags["alias"],
        from_version=params.get("from_version") or None,
        to_version=params["to_version"],
        actor=params.get("actor", ""),
        reason=tags.get("reason", params.get("reason", "")),
        kind=params.get("kind", ""),
        decision=tags["decision"],
        at=params.get("at", ""),
        run_id=run.info.run_id,
        seq=int(params.get("seq", "0")),
        approver=params.get("approver", ""),
    )


def moves(mlflow_client: MlflowClient, name: str, alias: str) -> list[Move]:
    """Every completed audited decision about an alias of a model, oldest first."""
    experiment = mlflow_client.get_experiment_by_name(AUDIT_EXPERIMENT)
    if experiment is None:
        return []
    runs = mlflow_client.search_runs(
        [experiment.experiment_id],
        f"tags.model_name = '{name}' and tags.alias = '{alias}' and attributes.status = 'FINISHED'",
        max_results=5000,
    )
    # A rejection carries the seq of the move it followed, so it sorts after that move.
    return sorted(
        (_move_of(r) for r in runs), key=lambda m: (m.seq, m.decision == "rejected", m.at)
    )


def history(settings: Settings, alias: str = PRODUCTION) -> list[Move]:
    """Every audited decision about an alias of the settings' model, oldest first."""
    with one_line_errors(settings):
        return moves(client(settings), settings.model_name, alias)


def production_stack(audited: list[Move]) -> list[str]:
    """Replay audited moves: promotions push a version, a rollback pops back to its target."""
    stack: list[str] = []
    for move in audited:
        if move.decision not in MOVES:
            continue
        if move.kind == "rollback" and move.to_version in stack:
            last = len(stack) - 1 - stack[::-1].index(move.to_version)
            del stack[last + 1 :]
        else:
            stack.append(move.to_version)
    return stack


def open_record(
    mlflow_client: MlflowClient,
    name: str,
    *,
    alias: str,
    from_version: str | None,
    to_version: str,
    actor: str,
    reason: str,
    kind: str,
    decision: str,
    seq: int,
    candidate: Scored | None = None,
    champion: Scored | None = None,
    thresholds: dict[str, float] | None = None,
    digest: str = "",
    signed: str = "",
    approver: str = "",
    request_id: str = "",
    extra: dict[str, str] | None = None,
) -> Move:
    """Write the audit run of a decision, left RUNNING: it counts once `close_record` finishes it.

    `signed` is the move's signed record (`registry.signing`), kept on the run as `signed_move`.
    `approver` and `request_id` name the second account and the request (`registry.requests`)
    a production move or refusal answers (param and tag `request_id`); `extra` adds params.
    """
    at = now()
    source = f"v{from_version}" if from_version else "none"
    run = mlflow_client.create_run(
        audit_experiment(mlflow_client),
        run_name=f"{decision} {name}@{alias} {source}->v{to_version}",
        tags={
            "kind": "promotion",
            "model_name": name,
            "alias": alias,
            "decision": decision,
            "reason": reason[:4000],
            "mlflow.user": actor,
            "mlflow.note.content": reason,
        }
        | ({"signed_move": signed} if signed else {})
        | ({"request_id": request_id} if request_id else {}),
    )
    run_id = str(run.info.run_id)
    params = {
        "alias": alias,
        "from_version": from_version or "",
        "to_version": to_version,
        "actor": actor,
        "reason": reason[:500],
        "kind": kind,
        "decision": decision,
        "at": at,
        "seq": str(seq),
        "evalset_digest": next((r.digest for r in (candidate, champion) if r is not None), digest),
    }
    params.update({f"threshold_{k}": str(v) for k, v in (thresholds or {}).items()})
    params.update({"approver": approver} if approver else {})
    params.update({"request_id": request_id} if request_id else {})
    params.update({k: v[:500] for k, v in (extra or {}).items()})
    metrics = {}
    for prefix, result in (("candidate", candidate), ("champion", champion)):
        if result is not None:
            metrics.update(result.metrics(prefix))
            if result.error:
                params[f"{prefix}_error"] = result.error[:500]
    now_ms = int(time.time() * 1000)
    try:
        mlflow_client.log_batch(
            run_id,
            metrics=[Metric(k, v, now_ms, 0) for k, v in metrics.items()],
            params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag("at", at)],
        )
    except BaseException:
        abandon_record(mlflow_client, run_id)
        raise
    return Move(
        alias, from_version, to_version, actor, reason, kind, decision, at, run_id, seq, approver
    )


def close_record(mlflow_client: MlflowClient, run_id: str) -> None:
    """Finish an audit run: from now on the decision is part of the trail."""
    finish_run(mlflow_client, run_id, "FINISHED")


def abandon_record(mlflow_client: MlflowClient, run_id: str) -> None:
    """Mark an audit run FAILED (best effort): the trail ignores it."""
    with contextlib.suppress(MlflowException):
        finish_run(mlflow_client, run_id, "FAILED")
