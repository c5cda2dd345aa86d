"""The whole pipeline end to end: up, train, gate, promote, serve, show the URLs."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

from captchaops.console import training_speed
from captchaops.decisions import gate
from captchaops.model.version import VersionError, load_registered
from captchaops.registry.aliases import resolve_alias
from captchaops.registry.names import PRODUCTION, STAGING
from captchaops.settings import Settings
from captchaops.stack import control
from captchaops.stack.services import ALL

if TYPE_CHECKING:
    from captchaops.training.loop import Progress

Say = Callable[[str], None]


@contextmanager
def _silent() -> Iterator[Progress]:
    """No progress shown (the default of `run_demo`)."""
    # here, not at the top: Keras loads TensorFlow (~6 s, and it prints), after the stack is up
    from captchaops.training.loop import silent

    yield silent


@dataclass
class DemoSummary:
    """What `captchaops demo` did and where everything is."""

    urls: dict[str, str]
    production_version: str | None
    staging_version: str | None
    trained_version: str | None = None
    test_seq_acc: float | None = None
    speed: str = ""  # steps done of planned, images/s (console.training_speed)
    decision: str = ""
    minutes: float = 0.0
    lines: list[str] = field(default_factory=list)


def wait_for_version(url: str, version: str, timeout: float = 60.0) -> bool:
    """Wait until the model server at url answers with this version."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(f"{url}/version", timeout=2)
            if answer.status_code == 200 and str(answer.json().get("version")) == version:
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    return False


def _refusal(settings: Settings, version: str | None) -> str | None:
    """Why the version cannot be served (e.g. logged before versions were checked data), if so."""
    if version is None:
        return None
    try:
        load_registered(settings.effective_tracking_uri, settings.model_name, version)
    except VersionError as exc:
        return str(exc)
    return None


def run_demo(
    settings: Settings,
    say: Say = print,
    retrain: bool = False,
    progress: Callable[[], AbstractContextManager[Progress]] | None = None,
) -> DemoSummary:
    """Bring the stack up, train unless a production model exists, gate it, wait for serving."""
    # here, not at the top: Keras loads TensorFlow (~6 s, and it prints); `demo --help` needs none
    from captchaops.training.run import TrainConfig, train

    started = time.monotonic()
    control.up(settings, ALL, say=say)
    summary = DemoSummary(
        urls={
            "MLflow UI": settings.effective_tracking_uri,
            "web app": settings.app_url,
            "production endpoint": f"{settings.server_url('production')}/invocations",
            "staging endpoint": f"{settings.server_url('staging')}/invocations",
        },
        production_version=resolve_alias(settings, PRODUCTION),
        staging_version=resolve_alias(settings, STAGING),
    )
    refused = _refusal(settings, summary.production_version)
    if refused:
        say(
            f"v{summary.production_version} @production cannot be served ({refused}); training anew"
        )
    if summary.production_version and not retrain and not refused:
        say(
            f"reusing v{summary.production_version} @production "
            "(run `captchaops demo --retrain` to train again)"
        )
        summary.decision = "kept the existing production model"
    else:
        say("training the demo model (about 5 minutes on 2 cores)")
        with (progress or _silent)() as report:
            result = train(TrainConfig.demo(), settings, report)
        summary.trained_version = result.version
        summary.test_seq_acc = result.metrics.get("test_seq_acc")
        summary.speed = training_speed(result.metrics)
        if result.staged:
            decision, _ = gate.auto_promote(settings, actor="captchaops demo")
            summary.decision = (
                "promoted: " if decision.promote else "refused: "
            ) + decision.reason()
        else:
            summary.decision = f"not staged: {result.rejection_reason}"
        summary.production_version = resolve_alias(settings, PRODUCTION)
        summary.staging_version = resolve_alias(settings, STAGING)
    for alias, version in (
        ("production", summary.production_version),
        ("staging", summary.staging_version),
    ):
        if version and not wait_for_version(settings.server_url(alias), version):
            say(
                f"warning: the {alias} server has not loaded v{version} yet; see `captchaops logs {alias}`"
            )
    summary.minutes = (time.monotonic() - started) / 60
    summary.lines = _summary_lines(summary)
    return summary


def _summary_lines(s: DemoSummary) -> list[str]:
    accuracy = (
        f"{s.test_seq_acc:.1%} sequence accuracy on held-out CAPTCHAs"
        if s.test_seq_acc is not None
        else "n/a (not retrained)"
    )
    return [
        f"trained version : {('v' + s.trained_version) if s.trained_version else 'none (reused)'}",
        f"test accuracy   : {accuracy}",
        *([f"training        : {s.speed}"] if s.speed else []),
        f"gate            : {s.decision}",
        f"serving         : production v{s.production_version or '-'}, staging v{s.staging_version or '-'}",
        f"took            : {s.minutes:.1f} min",
    ]
