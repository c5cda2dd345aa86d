"""What the model servers say about the live accuracy estimate of the versions they serve.

Read from each server's `/health` (`live_estimate`), for `captchaops models`, `captchaops
status` and the web app. A server that is down, or serves no calibrated version, adds nothing.
Behind a balancer `/health` is one replica's view; `summed` replaces it with the sum of every
replica's monitoring run (answers added, estimates weighted by answers) when more than one
replica reports. MLflow-free: the runs are read over `tracking_rest.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import httpx

from captchaops.live import monitoring as names
from captchaops.settings import Settings
from captchaops.tracking_rest import API, TrackingError, TrackingRest

SERVED_ALIASES = ("production", "staging")
TIMEOUT_S = 2.0


@dataclass(frozen=True)
class LiveState:
    """One served version's live estimate, as its model server reports it."""

    alias: str
    model: str
    version: str
    estimate: float | None
    """None until the server has seen enough answers of this version."""
    answers: int
    gate_accuracy: float | None
    """None for a version the gate never scored: it has no calibration, so no estimate."""
    alert: str | None
    replicas: int = 1
    """How many replicas' monitoring runs `answers` and `estimate` sum (1: this server alone)."""

    @property
    def calibrated(self) -> bool:
        """Whether the version has a calibration (the gate scored it) and so can be estimated."""
        return self.gate_accuracy is not None

    def short(self) -> str:
        """A narrow table cell: `61.5%`, `...` while too few answers were seen, `none` without
        a calibration."""
        if not self.calibrated:
            return "none"
        return f"{self.estimate:.1%}" if self.estimate is not None else "..."

    def line(self) -> str:
        """One sentence: the estimate, the answers it rests on and the gate's accuracy."""
        if not self.calibrated:
            return NO_CALIBRATION
        gate = f"gate accuracy {self.gate_accuracy:.1%}"
        across = f" from {self.replicas} replicas" if self.replicas > 1 else ""
        if self.estimate is None:
            return f"live estimate after more answers ({self.answers} so far{across}); {gate}"
        return f"live estimate {self.estimate:.1%} over {self.answers} answers{across}; {gate}"


NO_CALIBRATION = "no live estimate: never scored by the gate"
"""What a version without a calibration says (promoted with --force, or never through the gate)."""


def from_health(alias: str, body: Mapping[str, Any]) -> list[LiveState]:
    """The states in one server's `/health` body: the version it serves now, and its canary."""
    return _served(alias, body) + _canary(body)


def _canary(body: Mapping[str, Any]) -> list[LiveState]:
    """Production's canary (`/health` `canary` block), once the server knows its gate accuracy;
    a tripped canary's reason is its alert."""
    block = body.get("canary")
    if not isinstance(block, Mapping) or block.get("gate_accuracy") is None:
        return []
    try:
        estimate = block.get("estimate")
        return [
            LiveState(
                alias="canary",
                model=str(body.get("name") or ""),
                version=str(block["version"]),
                estimate=None if estimate is None else float(estimate),
                answers=int(block.get("answers") or 0),
                gate_accuracy=float(block["gate_accuracy"]),
                alert=f"canary tripped: {block.get('reason')}"
                if block.get("state") == "tripped"
                else None,
            )
        ]
    except (KeyError, TypeError, ValueError):
        return []


def _served(alias: str, body: Mapping[str, Any]) -> list[LiveState]:
    version = body.get("version")
    found = body.get("live_estimate")
    if version is None or not isinstance(found, Mapping):
        return []
    state = found.get(str(version))
    if not isinstance(state, Mapping):
        return []
    try:
        estimate = state.get("estimate")
        uncalibrated = state.get("calibrated") is False
        return [
            LiveState(
                alias=alias,
                model=str(body.get("name") or ""),
                version=str(version),
                estimate=None if estimate is None else float(estimate),
                answers=int(state.get("answers_seen") or 0),
                gate_accuracy=None if uncalibrated else float(state["gate_accuracy"]),
                alert=str(state["alert"]) if state.get("alert") else None,
            )
        ]
    except (KeyError, TypeError, ValueError):
        return []


def read(
    urls: Mapping[str, str], timeout: float = TIMEOUT_S, http: httpx.Client | None = None
) -> list[LiveState]:
    """Ask every server (alias -> base URL) at once; those that do not answer are left out."""
    client = http or httpx.Client()

    def one(alias: str, url: str) -> list[LiveState]:
        try:
            resp = client.get(f"{url.rstrip('/')}/health", timeout=timeout)
            body = resp.json()
        except (httpx.HTTPError, ValueError):
            return []
        return from_health(alias, body) if isinstance(body, Mapping) else []

    try:
        with ThreadPoolExecutor(max_workers=max(len(urls), 1)) as pool:
            found = list(pool.map(lambda item: one(*item), urls.items()))
    finally:
        if http is None:
            client.close()
    return [state for states in found for state in states]


def read_stack(settings: Settings, timeout: float = TIMEOUT_S) -> list[LiveState]:
    """The states of the production and staging servers of these settings."""
    return read({alias: settings.server_url(alias) for alias in SERVED_ALIASES}, timeout)


@dataclass(frozen=True)
class ReplicaSum:
    """Every replica's monitoring run of one (alias, version), summed."""

    answers: int
    estimate: float | None
    replicas: int


def replica_sums(
    settings: Settings, keys: list[tuple[str, str]], timeout: float = TIMEOUT_S
) -> dict[tuple[str, str], ReplicaSum]:
    """(alias, version) -> the sum over the replicas' monitoring runs of the settings' model;
    keys without runs, or all when the tracking server does not answer, are left out."""
    rest = TrackingRest.for_settings(settings, timeout=timeout)
    out: dict[tuple[str, str], ReplicaSum] = {}
    try:
        found = rest.call(
            "GET",
            f"{API}/experiments/get-by-name",
            missing_ok=True,
            params={"experiment_name": names.experiment_name(settings.model_name)},
        )
        experiment = (found.get("experiment") or {}).get("experiment_id")
        for alias, version in dict.fromkeys(keys) if experiment else ():
            body = {
                "experiment_ids": [experiment],
                "filter": names.replicas_filter(settings.model_name, alias, version),
                "max_results": 1000,
            }
            runs = rest.call("POST", f"{API}/runs/search", json=body).get("runs") or []
            if runs:
                out[(alias, version)] = _summed([_latest_metrics(run) for run in runs])
    except TrackingError:
        return {}
    finally:
        rest.close()
    return out


def _latest_metrics(run: Mapping[str, Any]) -> dict[str, float]:
    metrics = (run.get("data") or {}).get("metrics") or []
    return {str(m["key"]): float(m["value"]) for m in metrics if isinstance(m, dict)}


def _summed(runs: list[dict[str, float]]) -> ReplicaSum:
    answers = [run.get(names.LIVE_ANSWERS, 0.0) for run in runs]
    points = [
        (run[names.LIVE_ESTIMATE], n)
        for run, n in zip(runs, answers, strict=True)
        if names.LIVE_ESTIMATE in run
    ]
    weight = sum(n for _, n in points)
    if not points:
        estimate = None
    elif weight > 0:
        estimate = sum(value * n for value, n in points) / weight
    else:
        estimate = sum(value for value, _ in points) / len(points)
    return ReplicaSum(int(sum(answers)), estimate, len(runs))


def run_alias(state: LiveState) -> str:
    """The alias whose monitoring runs hold a state's version: a canary's are production's."""
    return "production" if state.alias == "canary" else state.alias


def summed(settings: Settings, states: list[LiveState]) -> list[LiveState]:
    """The states with answers and estimate summed over every replica, where more than one
    replica's monitoring run reports the version (one replica: its /health, which is fresher)."""
    sums = replica_sums(settings, [(run_alias(s), s.version) for s in states if s.calibrated])
    out = []
    for state in states:
        total = sums.get((run_alias(state), state.version))
        if total is not None and total.replicas > 1:
            estimate = total.estimate if total.estimate is not None else state.estimate
            state = replace(
                state,
                answers=max(total.answers, state.answers),
                estimate=estimate,
                replicas=total.replicas,
            )
        out.append(state)
    return out
