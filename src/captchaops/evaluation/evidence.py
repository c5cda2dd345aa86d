"""Live evidence for the gate: what the monitoring runs say about a candidate and its champion.

The staging server's run of the candidate holds its live estimate on the traffic staging saw
(production's copies, when production shadows to it; a production server that answers some
requests with the candidate, as a canary does, leaves a production run of it, used when staging
has none); the production server's run of the
champion holds the champion's estimate over time and how often the candidate agreed with it on
those copies. The gate compares the candidate's latest estimate with the champion's point
nearest in time, so both describe the same stretch of traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities import Metric, Run

from captchaops.live import monitoring as names
from captchaops.registry import PRODUCTION, STAGING

SAME_PERIOD_S = 600.0
"""The champion's estimate counts as "the same period" within this many seconds of the
candidate's latest estimate."""


@dataclass(frozen=True)
class Evidence:
    """What the monitoring runs hold about a candidate against its champion; None: nothing."""

    candidate_estimate: float | None = None
    candidate_answers: int = 0
    champion_estimate: float | None = None
    comparisons: int = 0
    agreement: float | None = None
    min_shadow: int = 1

    @property
    def estimates(self) -> bool:
        """Whether both live estimates, over the same period, are known."""
        return self.candidate_estimate is not None and self.champion_estimate is not None

    @property
    def shadow(self) -> bool:
        """Whether enough shadow comparisons were made for their agreement rate to count."""
        return self.agreement is not None and self.comparisons >= self.min_shadow

    def line(self) -> str:
        """The evidence used, in one line: or `no live evidence`."""
        parts = []
        if self.estimates:
            assert self.candidate_estimate is not None and self.champion_estimate is not None
            parts.append(
                f"live estimate {self.candidate_estimate:.1%} over {self.candidate_answers} "
                f"answers vs production's {self.champion_estimate:.1%} over the same period"
            )
        if self.shadow:
            assert self.agreement is not None
            parts.append(
                f"shadow agreement {self.agreement:.1%} over {self.comparisons} comparisons"
            )
        elif self.comparisons:
            parts.append(f"{self.comparisons} shadow comparisons (< {self.min_shadow}, unused)")
        if not parts:
            return "no live evidence"
        return "live evidence: " + ", ".join(parts)


def gather(
    client: MlflowClient,
    model: str,
    candidate: str,
    champion: str | None,
    *,
    min_shadow: int,
) -> Evidence:
    """The candidate's and champion's monitoring-run evidence (empty where there is none)."""
    experiment = client.get_experiment_by_name(names.experiment_name(model))
    if experiment is None:
        return Evidence(min_shadow=min_shadow)
    theirs = (
        _run(client, experiment.experiment_id, model, PRODUCTION, champion) if champion else None
    )
    estimate, answers, at = None, 0, 0
    # Staging's run (production's copies); else the candidate's run on the production server,
    # which a canary leaves.
    for alias in (STAGING, PRODUCTION):
        ours = _run(client, experiment.experiment_id, model, alias, candidate)
        latest = _latest(client, ours, names.LIVE_ESTIMATE) if ours is not None else None
        if ours is not None and latest is not None:
            estimate, at = latest.value, latest.timestamp
            answers = int(ours.data.metrics.get(names.LIVE_ANSWERS, 0))
            break
    champion_estimate, comparisons, agreement = None, 0, None
    if theirs is not None:
        if estimate is not None:
            champion_estimate = _nearest(client, theirs, names.LIVE_ESTIMATE, at)
        if theirs.data.tags.get(names.SHADOW_TAG) == candidate:
            comparisons = int(theirs.data.metrics.get(names.SHADOW_COMPARISONS, 0))
            agreement = theirs.data.metrics.get(names.SHADOW_AGREEMENT)
    return Evidence(
        candidate_estimate=estimate if champion_estimate is not None else None,
        candidate_answers=answers,
        champion_estimate=champion_estimate,
        comparisons=comparisons,
        agreement=agreement,
        min_shadow=min_shadow,
    )


def _run(
    client: MlflowClient, experiment_id: str, model: str, alias: str, version: str
) -> Run | None:
    found = client.search_runs(
        [experiment_id], names.key_filter(model, alias, version), max_results=1
    )
    return found[0] if found else None


def _latest(client: MlflowClient, run: Run, key: str) -> Metric | None:
    history = client.get_metric_history(run.info.run_id, key)
    return max(history, key=lambda m: m.timestamp) if history else None


def _nearest(client: MlflowClient, run: Run, key: str, at_ms: int) -> float | None:
    """The run's value of `key` logged nearest to `at_ms`, if within SAME_PERIOD_S."""
    history = client.get_metric_history(run.info.run_id, key)
    if not history:
        return None
    point = min(history, key=lambda m: abs(m.timestamp - at_ms))
    return point.value if abs(point.timestamp - at_ms) <= SAME_PERIOD_S * 1000 else None
