"""`captchaops promote --canary`: start a canary, watch the production server's breaker, and make
its verdict durable in the registry.

The production server decides at once (its breaker stops routing on a trip, `canary/slot.py`);
this watch reads that decision from `/health` and writes it down: on a trip it removes `@canary`
with an audit record giving the reason; when the window passes cleanly it says so, and with
`then_promote` moves `@production` to the candidate through the normal audited path (or, where
production moves need a second account, records the request and leaves the canary running).

With several production replicas each breaker sees only its share of the canary's traffic. The
watch also sums the canary's monitoring runs over every replica (`reported.replica_sums`) and
trips on the sum: once the replicas together have `canary_min_answers` answers and their
estimate is `canary_drop_points` below the canary's gate accuracy. Removing `@canary` stops
the canary on every replica.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from captchaops.canary.moves import end_canary
from captchaops.decisions import approval
from captchaops.live.reported import ReplicaSum, replica_sums
from captchaops.registry.aliases import resolve_alias
from captchaops.registry.names import CANARY
from captchaops.registry.requests import Request
from captchaops.settings import Settings

EXIT_CLEAN = 0
EXIT_ERROR = 1
EXIT_TRIPPED = 3
POLL_S = 2.0
REPORT_EVERY_S = 30.0


@dataclass(frozen=True)
class Outcome:
    """How a watched canary ended: `code` is the command's exit status, `line` what it says."""

    code: int
    line: str
    block: dict[str, Any] | None = None
    left_to_caller: str = ""
    """With `act` off: "end" (the breaker tripped; `line` is why) or "promote" (the window
    passed cleanly under --then-promote): the move the caller makes (the promotion service)."""


def health_block(url: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """The production server's `/health` canary block (None: no canary); raises httpx errors."""
    resp = httpx.get(f"{url}/health", timeout=timeout)
    body = resp.json()
    block = body.get("canary") if isinstance(body, dict) else None
    return block if isinstance(block, dict) else None


def describe(block: dict[str, Any]) -> str:
    """The block as a short line: state, answers, estimate, p99."""
    estimate = block.get("estimate")
    p99 = block.get("p99_ms")
    return (
        f"{block.get('state')}, {block.get('answers')} answers, "
        f"estimate {'-' if estimate is None else f'{estimate:.1%}'}, "
        f"p99 {'-' if p99 is None else f'{p99:.1f} ms'}"
    )


def watch(
    settings: Settings,
    version: str,
    minutes: float,
    *,
    then_promote: bool = False,
    actor: str | None = None,
    say: Callable[[str], None] = print,
    poll_s: float = POLL_S,
    act: bool = True,
) -> Outcome:
    """Watch canary `version` on the production server for `minutes` and act on what it shows
    (`act` off: say what to do in `Outcome.left_to_caller` instead of moving an alias)."""
    url = settings.server_url("production")
    deadline = time.monotonic() + minutes * 60
    last: dict[str, Any] | None = None
    seen, error, reported = False, "", 0.0
    while True:
        try:
            block = health_block(url)
            error = ""
        except (httpx.HTTPError, ValueError) as exc:
            block, error = None, f"{type(exc).__name__}: {exc}"
        if block is not None and block.get("version") == version:
            last, seen = block, seen or block.get("state") != "waiting"
            if block.get("state") == "tripped":
                return _tripped(settings, version, str(block.get("reason")), actor, block, act)
            total = replica_sums(settings, [("production", version)]).get(("production", version))
            if total is not None and total.replicas > 1:
                last = block = {
                    **block,
                    "answers": max(total.answers, int(block.get("answers") or 0)),
                }
                why = summed_trip(settings, block, total)
                if why is not None:
                    return _tripped(settings, version, why, actor, block, act)
            if time.monotonic() - reported >= REPORT_EVERY_S:
                say(f"canary v{version}: {describe(block)}")
                reported = time.monotonic()
        elif not error and resolve_alias(settings, CANARY) != version:
            return Outcome(
                EXIT_ERROR,
                f"@canary no longer holds v{version} (moved by someone else); stopped watching",
                last,
            )
        if time.monotonic() >= deadline:
            break
        time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))
    return _window_passed(
        settings, version, minutes, url, seen, error, last, then_promote, actor, act
    )


def summed_trip(settings: Settings, block: dict[str, Any], total: ReplicaSum) -> str | None:
    """Why the replicas' summed evidence trips the canary, or None while it holds (or is too
    thin to judge: fewer than `canary_min_answers` answers, or no estimate yet)."""
    gate = block.get("gate_accuracy")
    if gate is None or total.estimate is None or total.answers < settings.canary_min_answers:
        return None
    floor = float(gate) - settings.canary_drop_points / 100
    if total.estimate >= floor:
        return None
    return (
        f"live estimate {total.estimate:.1%} over {total.answers} answers from "
        f"{total.replicas} replicas, more than {settings.canary_drop_points:g} points below "
        f"its gate accuracy {float(gate):.1%}"
    )


def _tripped(
    settings: Settings,
    version: str,
    reason: str,
    actor: str | None,
    block: dict[str, Any],
    act: bool = True,
) -> Outcome:
    if not act:
        return Outcome(EXIT_TRIPPED, reason, block, left_to_caller="end")
    move = end_canary(
        settings,
        reason=f"canary breaker tripped: {reason}",
        actor=actor,
        version=version,
        tripped=True,
    )
    return Outcome(
        EXIT_TRIPPED,
        f"canary v{version} tripped ({reason}); rolled back: {move.line()}",
        block,
    )


def _window_passed(
    settings: Settings,
    version: str,
    minutes: float,
    url: str,
    seen: bool,
    error: str,
    last: dict[str, Any] | None,
    then_promote: bool,
    actor: str | None,
    act: bool = True,
) -> Outcome:
    stays = f"@canary stays on v{version} with the server's breaker"
    if not seen or last is None:
        why = f" ({error})" if error else ""
        return Outcome(
            EXIT_ERROR,
            f"the production server at {url} never routed to canary v{version} in "
            f"{minutes:g} min{why}; {stays}; check `captchaops status` and its /health",
            last,
        )
    answers, needed = int(last.get("answers") or 0), int(last.get("min_answers") or 0)
    if answers < needed:
        line = (
            f"canary v{version}: no trip in {minutes:g} min, but only {answers} answers "
            f"(the breaker judges after {needed}); {stays}"
        )
        if then_promote:
            return Outcome(EXIT_TRIPPED, f"{line}; not promoted: watch longer", last)
        return Outcome(EXIT_CLEAN, line, last)
    clean = f"canary v{version} passed {minutes:g} min cleanly ({describe(last)})"
    if not then_promote:
        return Outcome(EXIT_CLEAN, f"{clean}; {stays}", last)
    if not act:
        return Outcome(EXIT_CLEAN, clean, last, left_to_caller="promote")
    reason = f"canary passed {minutes:g} min: {describe(last)}"
    promoted = approval.promote(
        settings, version=version, from_alias=None, reason=reason, actor=actor, kind="canary"
    )
    if isinstance(promoted, Request):
        return Outcome(
            EXIT_CLEAN,
            f"{clean}; {stays}; waiting for approval: request {promoted.short_id}; another "
            f"account approves it with `captchaops approve {promoted.short_id}`",
            last,
        )
    end_canary(settings, reason=f"promoted to @production: {reason}", actor=actor, version=version)
    return Outcome(EXIT_CLEAN, f"{clean}; promoted: {promoted.line()}", last)
