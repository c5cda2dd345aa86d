"""What `captchaops models` shows: versions, aliases, status, key metrics and the last moves."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from captchaops.live.estimate import Calibration
from captchaops.live.reported import LiveState, read_stack, summed
from captchaops.mlflow_scope import client
from captchaops.registry.aliases import require_model
from captchaops.registry.errors import one_line_errors
from captchaops.registry.unaudited import last_moves as moves_of
from captchaops.registry.unaudited import unaudited_aliases
from captchaops.settings import Settings


@dataclass(frozen=True)
class VersionRow:
    """What `captchaops models` shows about one version."""

    version: str
    aliases: list[str]
    stage: str
    status: str
    created: str
    test_seq_acc: float | None
    eval_seq_acc: float | None
    eval_cer: float | None
    note: str
    calibrated: bool = False
    """Whether the gate scored it (so a server can estimate its live accuracy)."""


@dataclass(frozen=True)
class Listing:
    """All versions of the registered model, newest first, each alias's last audited move, and
    the live estimate of the versions the model servers serve (summed over replicas)."""

    name: str
    rows: list[VersionRow]
    last_moves: dict[str, str]
    live: list[LiveState] = field(default_factory=list)
    unaudited: dict[str, str] = field(default_factory=dict)
    """Managed aliases whose version no audited move put there (alias -> version): set around
    captchaops, in the MLflow UI or with its client."""

    def live_of(self, version: str) -> list[LiveState]:
        """The live states of one version (one per server serving it)."""
        return [state for state in self.live if state.version == version]


def _float(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _test_accuracy(mlflow_client: MlflowClient, run_id: str | None) -> float | None:
    """The training run's test sequence accuracy, if the run still exists."""
    if not run_id:
        return None
    try:
        return mlflow_client.get_run(run_id).data.metrics.get("test_seq_acc")
    except MlflowException:
        return None


def list_versions(settings: Settings, limit: int = 50) -> Listing:
    """Versions newest first with aliases, stage, validation status and key metrics."""
    name = settings.model_name
    with one_line_errors(settings):
        mlflow_client = client(settings)
        require_model(mlflow_client, settings)
        model = mlflow_client.get_registered_model(name)
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        versions = sorted(
            mlflow_client.search_model_versions(f"name='{name}'"), key=lambda mv: -int(mv.version)
        )[:limit]
        rows = []
        for mv in versions:
            tags = mv.tags or {}
            rows.append(
                VersionRow(
                    version=str(mv.version),
                    aliases=sorted(aliases.get(str(mv.version), [])),
                    stage=mv.current_stage or "None",
                    status=tags.get("validation_status", "pending"),
                    created=datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).strftime(
                        "%Y-%m-%d %H:%M"
                    ),
                    test_seq_acc=_test_accuracy(mlflow_client, mv.run_id),
                    eval_seq_acc=_float(tags.get("eval_seq_acc")),
                    eval_cer=_float(tags.get("eval_cer")),
                    note=tags.get("rejection_reason") or tags.get("promotion_reason", ""),
                    calibrated=Calibration.from_tags(tags) is not None,
                )
            )
        last_moves = moves_of(dict(model.tags or {}))
        served = summed(settings, [s for s in read_stack(settings) if s.model == name])
        unaudited = unaudited_aliases(model.aliases or {}, last_moves)
        return Listing(name, rows, last_moves, served, unaudited)
