"""Names of the monitoring runs: one MLflow run per (model, alias, version) a model server serves.

Model servers write them over REST (`serving/monitoring_runs.py`); the gate reads them as evidence
(`evaluation/evidence.py`). MLflow-free, so both sides share these names.
"""

from __future__ import annotations

KEY_TAG = "monitor_key"
"""`<model>/<alias>/<version>`: how a server finds its run again after a restart."""
SHADOW_TAG = "shadow_version"
"""The version the shadow metrics of the run's latest points compare against."""

LIVE_ESTIMATE = "live_estimate"
LIVE_ANSWERS = "live_answers"
LIVE_ALERT = "live_alert"
GATE_ACCURACY = "gate_accuracy"
SHADOW_COMPARISONS = "shadow_comparisons"
SHADOW_AGREEMENT = "shadow_agreement_rate"
SHADOW_CONFIDENCE_DIFF = "shadow_confidence_diff_mean"
SHADOW_P50 = "shadow_latency_p50_seconds"
SHADOW_P99 = "shadow_latency_p99_seconds"
SHADOW_DROPPED = "shadow_dropped"
SHADOW_SKIPPED = "shadow_skipped"


SUFFIX = "-monitoring"


def experiment_name(model: str) -> str:
    """The experiment holding a registered model's monitoring runs."""
    return f"{model}{SUFFIX}"


def is_monitoring(experiment: str) -> bool:
    """Whether an experiment (by name) holds monitoring runs."""
    return experiment.endswith(SUFFIX)


def run_name(model: str, alias: str, version: str) -> str:
    """The monitoring run's name, as the MLflow UI lists it."""
    return f"monitor-{model}-{alias}-v{version}"


def run_key(model: str, alias: str, version: str) -> str:
    """The value of KEY_TAG of that run."""
    return f"{model}/{alias}/{version}"


def key_filter(model: str, alias: str, version: str) -> str:
    """An MLflow search filter that finds the run (names and versions hold no quotes)."""
    return f"tags.{KEY_TAG} = '{run_key(model, alias, version)}'"
