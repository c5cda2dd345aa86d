"""Names of the monitoring runs: one MLflow run per (model, alias, version, replica) a model
server serves, so replicas of one alias never overwrite each other's evidence.

Model servers write them over REST (`serving/monitoring_runs.py`); the gate reads them as evidence
(`evaluation/evidence.py`), summing the replicas of an alias. MLflow-free, so both sides share
these names.
"""

from __future__ import annotations

import socket

KEY_TAG = "monitor_key"
"""`<model>/<alias>/<version>/<replica>`: how a server finds its run again after a restart."""
ALIAS_KEY_TAG = "monitor_alias_key"
"""`<model>/<alias>/<version>`: the same on every replica, how readers find all of them."""
REPLICA_TAG = "replica"
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


LOCAL_BINDS = ("", "0.0.0.0", "::", "127.0.0.1", "::1", "localhost")


def default_replica_id(port: int, bind: str | None = None) -> str:
    """A replica's id when none is set, the same across its restarts: `<hostname>-<port>`, or
    `<hostname>-<address>-<port>` when it binds one address of the host (several hosts can
    share a hostname: containers or network namespaces on one machine)."""
    if bind and bind.strip("[]") not in LOCAL_BINDS and not bind.startswith("127."):
        return f"{socket.gethostname()}-{bind.strip('[]')}-{port}"
    return f"{socket.gethostname()}-{port}"


def run_name(model: str, alias: str, version: str, replica: str) -> str:
    """The monitoring run's name, as the MLflow UI lists it."""
    return f"monitor-{model}-{alias}-v{version}-{replica}"


def alias_key(model: str, alias: str, version: str) -> str:
    """The value of ALIAS_KEY_TAG of the runs of every replica of that alias and version."""
    return f"{model}/{alias}/{version}"


def run_key(model: str, alias: str, version: str, replica: str) -> str:
    """The value of KEY_TAG of one replica's run."""
    return f"{alias_key(model, alias, version)}/{replica}"


def key_filter(model: str, alias: str, version: str, replica: str) -> str:
    """An MLflow search filter that finds one replica's run."""
    return f"tags.{KEY_TAG} = '{_quoted(run_key(model, alias, version, replica))}'"


def replicas_filter(model: str, alias: str, version: str) -> str:
    """An MLflow search filter that finds the runs of every replica of that alias and version."""
    return f"tags.{ALIAS_KEY_TAG} = '{_quoted(alias_key(model, alias, version))}'"


def _quoted(value: str) -> str:
    """Model names and versions hold no quotes; a replica id set by hand might."""
    return value.replace("'", "")
