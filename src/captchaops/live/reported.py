"""What the model servers say about the live accuracy estimate of the versions they serve.

Read from each server's `/health` (`live_estimate`), for `captchaops models`, `captchaops
status` and the web app. A server that is down, or serves no calibrated version, adds nothing.
MLflow-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from captchaops.settings import Settings

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
        if self.estimate is None:
            return f"live estimate after more answers ({self.answers} so far); {gate}"
        return f"live estimate {self.estimate:.1%} over {self.answers} answers; {gate}"


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
