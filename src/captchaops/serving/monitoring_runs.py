"""Monitoring runs: what a model server knows of each version it serves, logged to MLflow.

Every `monitor_seconds` and once at shutdown the server logs, for each version that answered
since the last time, its live accuracy estimate, answers seen and alert, and, when it shadows,
how its shadow compared: agreement rate, mean confidence difference, shadow latency p50/p99
and copies dropped. One run per (model, alias, version, replica), named
`monitor-<model>-<alias>-v<N>-<replica>` in the experiment `<model>-monitoring`, found again by
its `monitor_key` tag after a restart; readers sum the replicas of an alias.
All over `tracking_rest.py`, in a thread of its own: the tracking server being slow, down or
read-only never touches an answer. Without write rights it logs one line and stops trying.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
from prometheus_client.metrics import MetricWrapperBase

from captchaops.live import monitoring as names
from captchaops.serving.metrics import ServingMetrics
from captchaops.tracking_rest import API, TrackingError, TrackingRest, TrackingUnreachable

log = logging.getLogger(__name__)

NO_RIGHTS = ("PERMISSION_DENIED", "UNAUTHENTICATED")
SHUTDOWN_TIMEOUT_S = 2.0
"""How long `stop` waits for a log in progress before the last one (uvicorn allows 5 s)."""
REST_TIMEOUT_S = 2.0
"""Each REST call of the monitor gives up after this long."""


@dataclass
class _Pair:
    """Shadow outcomes of one (this server's version, shadow version) pair, so far."""

    agree: float = 0.0
    disagree: float = 0.0
    diff_sum: float = 0.0
    diff_count: float = 0.0
    latency: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count


@dataclass
class _Shadowed:
    """Shadow outcomes of one version of this server, by shadow version."""

    pairs: dict[str, _Pair] = field(default_factory=dict)
    dropped: float = 0.0
    skipped: float = 0.0


class Monitor:
    """Logs a monitoring run per served version every `interval_s` and at `stop`."""

    def __init__(
        self,
        rest: TrackingRest,
        model: str,
        alias: str,
        metrics: ServingMetrics,
        interval_s: float,
        *,
        replica: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rest, self.model, self.alias = rest, model, alias
        self._replica = replica
        self.metrics, self.interval_s, self._clock = metrics, interval_s, clock
        self.enabled = True
        self.runs: dict[str, str] = {}  # version -> run id
        self._experiment: str | None = None
        self._logged: dict[str, tuple[float, float]] = {}  # version -> (answers, comparisons)
        self._shadow_of: dict[str, str] = {}  # version -> shadow version last compared against
        self._seen_pairs: dict[tuple[str, str], float] = {}
        self._stopping = threading.Event()
        self._flushing = threading.Lock()
        self._thread: threading.Thread | None = None
        self._unreachable = False

    @property
    def replica(self) -> str:
        """This server's replica id: the one given or named in its metrics, else
        `<hostname>-<port it listens on>`."""
        if self._replica is None:
            self._replica = self.metrics.replica or listening_replica_id()
        return self._replica

    def start(self) -> None:
        """Log every `interval_s` in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, name="monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, log a last time and mark the runs finished (blocking, bounded)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(SHUTDOWN_TIMEOUT_S)
        self.flush()
        for run_id in self.runs.values() if self.enabled else ():
            try:
                self._update(run_id, "FINISHED")
            except TrackingError:
                break
        self.rest.close()

    def _loop(self) -> None:
        while not self._stopping.wait(self.interval_s):
            self.flush()

    def flush(self) -> None:
        """Log what changed since the last call; never raises (one call at a time)."""
        with self._flushing:
            if self.enabled:
                self._flush_once()

    def _flush_once(self) -> None:
        try:
            self._flush()
            if self._unreachable:
                log.info("monitoring runs: the tracking server answers again")
            self._unreachable = False
        except TrackingError as exc:
            if exc.status in (401, 403) or exc.error_code in NO_RIGHTS:
                self.enabled = False
                log.warning(
                    "monitoring runs are off: this server's account may not write to the "
                    "tracking server (%s); grant it EDIT on experiment %s to have them",
                    exc.error_code or f"HTTP {exc.status}",
                    names.experiment_name(self.model),
                )
            elif not self._unreachable:
                self._unreachable = isinstance(exc, TrackingUnreachable)
                log.warning("monitoring runs: not logged this time (%s); retrying", exc)
        except Exception:
            log.exception("monitoring runs: logging failed")

    def _flush(self) -> None:
        quality = self.metrics.quality.snapshot() if self.metrics.quality is not None else {}
        shadowed = shadow_outcomes(self.metrics)
        now_ms = int(self._clock() * 1000)
        for version in sorted({*quality, *shadowed}):
            live = quality.get(version, {})
            values, tags = self._values(version, live, shadowed.get(version))
            answers = float(live.get("answers_seen") or 0)
            progress = (answers, values.get(names.SHADOW_COMPARISONS, 0.0))
            if not values or self._logged.get(version) == progress:
                continue
            run_id = self._run(version)
            body = {
                "run_id": run_id,
                "metrics": [
                    {"key": k, "value": v, "timestamp": now_ms, "step": 0}
                    for k, v in values.items()
                ],
                "tags": [{"key": k, "value": v} for k, v in tags.items()],
            }
            self.rest.call("POST", f"{API}/runs/log-batch", json=body)
            self._logged[version] = progress

    def _values(
        self, version: str, live: dict[str, Any], shadow: _Shadowed | None
    ) -> tuple[dict[str, float], dict[str, str]]:
        values: dict[str, float] = {}
        if live and live.get("calibrated", True):
            values[names.LIVE_ANSWERS] = float(live.get("answers_seen") or 0)
            values[names.GATE_ACCURACY] = float(live["gate_accuracy"])
            values[names.LIVE_ALERT] = 1.0 if live.get("alert") else 0.0
            if live.get("estimate") is not None:
                values[names.LIVE_ESTIMATE] = float(live["estimate"])
        if shadow is None:
            return values, {}
        values[names.SHADOW_DROPPED] = shadow.dropped
        values[names.SHADOW_SKIPPED] = shadow.skipped
        other = self._current_shadow(version, shadow)
        pair = shadow.pairs.get(other) if other else None
        if other is None or pair is None:
            return values, {}
        compared = pair.agree + pair.disagree
        values[names.SHADOW_COMPARISONS] = compared
        if compared:
            values[names.SHADOW_AGREEMENT] = pair.agree / compared
        if pair.diff_count:
            values[names.SHADOW_CONFIDENCE_DIFF] = pair.diff_sum / pair.diff_count
        for key, q in ((names.SHADOW_P50, 0.5), (names.SHADOW_P99, 0.99)):
            seconds = quantile(pair.latency, q)
            if seconds is not None:
                values[key] = seconds
        return values, {names.SHADOW_TAG: other}

    def _current_shadow(self, version: str, shadow: _Shadowed) -> str | None:
        """The shadow version compared against most recently (the one whose count grew)."""
        current = self._shadow_of.get(version)
        for other, pair in shadow.pairs.items():
            count = pair.agree + pair.disagree
            if count > self._seen_pairs.get((version, other), 0.0):
                current = other
            self._seen_pairs[(version, other)] = count
        if current is None and shadow.pairs:
            current = max(
                shadow.pairs, key=lambda o: shadow.pairs[o].agree + shadow.pairs[o].disagree
            )
        if current is not None:
            self._shadow_of[version] = current
        return current

    def _run(self, version: str) -> str:
        """The run of this version: found by its key tag (reopened), else created."""
        if version in self.runs:
            return self.runs[version]
        experiment = self._experiment_id()
        replica = self.replica
        found = (
            self.rest.call(
                "POST",
                f"{API}/runs/search",
                json={
                    "experiment_ids": [experiment],
                    "filter": names.key_filter(self.model, self.alias, version, replica),
                    "max_results": 1,
                    "order_by": ["attributes.start_time ASC"],
                },
            ).get("runs")
            or []
        )
        name = names.run_name(self.model, self.alias, version, replica)
        if found:
            run_id = str(found[0]["info"]["run_id"])
            self._update(run_id, "RUNNING")
        else:
            tags = {
                names.KEY_TAG: names.run_key(self.model, self.alias, version, replica),
                names.ALIAS_KEY_TAG: names.alias_key(self.model, self.alias, version),
                names.REPLICA_TAG: replica,
                "model_name": self.model,
                "alias": self.alias,
                "version": version,
                "mlflow.runName": name,
                "mlflow.source.name": "captchaops serve",
            }
            created = self.rest.call(
                "POST",
                f"{API}/runs/create",
                json={
                    "experiment_id": experiment,
                    "run_name": name,
                    "start_time": int(self._clock() * 1000),
                    "tags": [{"key": k, "value": v} for k, v in tags.items()],
                },
            )
            run_id = str(created["run"]["info"]["run_id"])
            log.info("monitoring run %s", name)
        self.runs[version] = run_id
        return run_id

    def _experiment_id(self) -> str:
        if self._experiment is None:
            name = names.experiment_name(self.model)
            path = f"{API}/experiments/get-by-name"
            found = self.rest.call("GET", path, params={"experiment_name": name}, missing_ok=True)
            if not found:
                try:
                    made = self.rest.call("POST", f"{API}/experiments/create", json={"name": name})
                    self._experiment = str(made["experiment_id"])
                    return self._experiment
                except TrackingError as exc:  # created meanwhile by the other model server
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                found = self.rest.call("GET", path, params={"experiment_name": name})
            self._experiment = str(found["experiment"]["experiment_id"])
        return self._experiment

    def _update(self, run_id: str, status: str) -> None:
        body: dict[str, object] = {"run_id": run_id, "status": status}
        if status == "FINISHED":
            body["end_time"] = int(self._clock() * 1000)
        self.rest.call("POST", f"{API}/runs/update", json=body)


def listening_replica_id() -> str:
    """`<hostname>-<port>` of the first port this process listens on (`<hostname>-<pid>` when it
    listens on none): the replica id of a server started without one."""
    try:
        ports = sorted(
            c.laddr.port
            for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        )
    except psutil.Error:
        ports = []
    if ports:
        return names.default_replica_id(ports[0])
    return f"{socket.gethostname()}-pid{psutil.Process().pid}"


def shadow_outcomes(metrics: ServingMetrics) -> dict[str, _Shadowed]:
    """The shadow counters and histograms so far, by this server's version."""
    out: dict[str, _Shadowed] = {}

    def pair(labels: dict[str, str]) -> _Pair:
        shadowed = out.setdefault(labels["production_version"], _Shadowed())
        return shadowed.pairs.setdefault(labels["staging_version"], _Pair())

    for name, labels, value in _samples(metrics.shadow_requests):
        if not name.endswith("_total"):
            continue
        result = labels["result"]
        shadowed = out.setdefault(labels["production_version"], _Shadowed())
        if result in ("agree", "disagree"):
            setattr(pair(labels), result, getattr(pair(labels), result) + value)
        elif result in ("dropped", "skipped"):
            setattr(shadowed, result, getattr(shadowed, result) + value)
    for name, labels, value in _samples(metrics.shadow_confidence_diff):
        if name.endswith("_count"):
            pair(labels).diff_count = value
    for (version, other), total in metrics.shadow_sums().items():
        pair({"production_version": version, "staging_version": other}).diff_sum = total
    for name, labels, value in _samples(metrics.shadow_latency):
        if name.endswith("_bucket"):
            pair(labels).latency[float(labels["le"])] = value
    return out


def _samples(metric: MetricWrapperBase) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in metric.collect()
        for s in family.samples
    ]


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """The q-quantile of a cumulative histogram, interpolated within its bucket as Prometheus'
    `histogram_quantile` does; None when empty. Past the last finite bound: that bound."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower
