"""Live evidence for the gate: what the monitoring runs say about a candidate and its champion.

The staging server's run of the candidate holds its live estimate on the traffic staging saw
(production's copies, when production shadows to it; a production server that answers some
requests with the candidate, as a canary does, leaves a production run of it, used when staging
has none); the production server's run of the
champion holds the champion's estimate over time and how often the candidate agreed with it on
those copies. The gate compares the candidate's latest estimate with the champion's point
nearest in time, so both describe the same stretch of traffic.

Every replica of an alias logs a run of its own; the evidence is their sum: answers and shadow
comparisons add up, estimates and agreement rates are averaged weighted by the answers and
comparisons they rest on.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities import Metric, Run

from captchaops.live import monitoring as names
from captchaops.registry.names import PRODUCTION, STAGING

SAME_PERIOD_S = 600.0
"""The champion's estimate counts as "the same period" within this many seconds of the
candidate's latest estimate."""
MAX_REPLICAS = 1000
"""Replica runs read per (alias, version)."""


@dataclass(frozen=True)
class Evidence:
    """What the monitoring runs hold about a candidate against its champion; None: nothing."""

    candidate_estimate: float | None = None
    candidate_answers: int = 0
    champion_estimate: float | None = None
    comparisons: int = 0
    agreement: float | None = None
    min_shadow: int = 1
    replicas: int = 0
    """How many replicas' runs the candidate's answers sum."""

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
            across = f" from {self.replicas} replicas" if self.replicas > 1 else ""
            parts.append(
                f"live estimate {self.candidate_estimate:.1%} over {self.candidate_answers} "
                f"answers{across} vs production's {self.champion_estimate:.1%} over the same "
                "period"
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
        _runs(client, experiment.experiment_id, model, PRODUCTION, champion) if champion else []
    )
    estimate, answers, at, replicas = None, 0, 0, 0
    # Staging's runs (production's copies); else the candidate's runs on the production servers,
    # which a canary leaves. Answers add up over every replica, estimates over those that have
    # seen enough answers for one.
    for alias in (STAGING, PRODUCTION):
        runs = _runs(client, experiment.experiment_id, model, alias, candidate)
        points = []  # (latest estimate, answers) of each replica that has one
        for ours in runs:
            latest = _latest(client, ours, names.LIVE_ESTIMATE)
            if latest is not None:
                points.append((latest.value, _answers(ours)))
                at = max(at, latest.timestamp)
        if runs and (points or not replicas):
            estimate = weighted_mean(points)
            answers, replicas = int(sum(_answers(run) for run in runs)), len(runs)
        if points:
            break
    champion_points, shadow_points = [], []
    for run in theirs:
        if estimate is not None:
            near = _nearest(client, run, names.LIVE_ESTIMATE, at)
            if near is not None:
                champion_points.append((near, _answers(run)))
        if run.data.tags.get(names.SHADOW_TAG) == candidate:
            compared = run.data.metrics.get(names.SHADOW_COMPARISONS, 0.0)
            rate = run.data.metrics.get(names.SHADOW_AGREEMENT)
            if rate is not None:
                shadow_points.append((rate, compared))
    champion_estimate = weighted_mean(champion_points)
    return Evidence(
        candidate_estimate=estimate if champion_estimate is not None else None,
        candidate_answers=answers,
        champion_estimate=champion_estimate,
        comparisons=int(sum(n for _, n in shadow_points)),
        agreement=weighted_mean(shadow_points),
        min_shadow=min_shadow,
        replicas=replicas,
    )


def weighted_mean(points: list[tuple[float, float]]) -> float | None:
    """The mean of (value, weight) points by weight (plain mean when no weight); None: none."""
    if not points:
        return None
    total = sum(weight for _, weight in points)
    if total <= 0:
        return sum(value for value, _ in points) / len(points)
    return sum(value * weight for value, weight in points) / total


def _answers(run: Run) -> float:
    return float(run.data.metrics.get(names.LIVE_ANSWERS, 0.0))


def _runs(
    client: MlflowClient, experiment_id: str, model: str, alias: str, version: str
) -> list[Run]:
    """The monitoring runs of every replica serving `version` under `alias`."""
    return list(
        client.search_runs(
            [experiment_id], names.replicas_filter(model, alias, version), max_results=MAX_REPLICAS
        )
    )


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
