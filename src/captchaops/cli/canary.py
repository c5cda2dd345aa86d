"""What `promote --canary` and `rollback --canary` do (the options live on those commands).

With CAPTCHAOPS_PROMOTIONS_URL set, every move (start, end, a trip's end, --then-promote's
promotion) is the promotion service's; the watch itself runs here and only reads.
"""

from __future__ import annotations

from typing import Any

from captchaops.canary import moves as canaries
from captchaops.canary import watch as canary
from captchaops.cli.base import console, fail
from captchaops.console import literal
from captchaops.decisions import approval
from captchaops.registry.errors import RegistryError
from captchaops.registry.requests import Request
from captchaops.settings import Settings
from captchaops.stack.promotions_client import ServiceError, ask

WATCH_MINUTES = 5.0


def _ask(settings: Settings, path: str, body: dict[str, Any], actor: str | None) -> dict[str, Any]:
    """The promotion service's answer; one line and exit 1 when it refuses."""
    try:
        return ask(settings, "POST", path, body, actor=actor)
    except ServiceError as exc:
        fail(str(exc))
        raise  # fail exits; this line only tells the type checker


def start(
    settings: Settings,
    *,
    percent: int,
    version: str | None,
    from_alias: str | None,
    reason: str,
    actor: str | None,
    watch_minutes: float,
    detach: bool,
    then_promote: bool,
) -> None:
    """Give the candidate @canary at `percent`, then watch its breaker unless `detach`."""
    if detach and then_promote:
        fail("--then-promote needs the watch; leave out --detach")
    if not detach and watch_minutes <= 0:
        fail("--watch takes minutes above 0 (e.g. --watch 5), or pass --detach")
    service = bool(settings.promotions_url)
    if service:
        body = {"percent": percent, "version": version, "from": from_alias, "reason": reason}
        answer = _ask(settings, "/canary", body, actor)
        started, line = str(answer.get("version")), str(answer.get("line"))
        if answer.get("result") == "waiting":
            _waiting(settings, str((answer.get("request") or {}).get("short_id")), line)
            return
        if answer.get("result") != "canary":
            fail(
                f"the promotion service at {settings.promotions_url} answered "
                f"{answer.get('result')!r}, not a canary: check CAPTCHAOPS_PROMOTIONS_URL"
            )
    else:
        try:
            done = approval.start_canary(
                settings,
                percent=percent,
                version=version,
                from_alias=from_alias,
                reason=reason,
                actor=actor,
            )
        except RegistryError as exc:
            fail(str(exc))
        if isinstance(done, Request):
            _waiting(settings, done.short_id, done.line())
            return
        started, line = done.to_version, done.line()
    console.print(literal(f"canary: {line}"), highlight=False)
    if detach:
        console.print(
            f"not watching: the production server's breaker stops routing to v{started} "
            "on a trip; end it for good with `captchaops rollback --canary`",
            highlight=False,
        )
        return
    console.print(
        f"watching the production server's breaker for {watch_minutes:g} min "
        "(Ctrl-C stops watching, not the canary)",
        highlight=False,
    )
    try:
        outcome = canary.watch(
            settings,
            started,
            watch_minutes,
            then_promote=then_promote,
            actor=actor,
            say=lambda said: console.print(said, highlight=False),
            act=not service,
        )
    except RegistryError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail(
            f"stopped watching; @canary stays on v{started} with the server's breaker; "
            "end it with `captchaops rollback --canary`",
            130,
        )
    if outcome.left_to_caller:
        outcome = _service_act(settings, started, outcome, watch_minutes, actor)
    if outcome.code != canary.EXIT_CLEAN:
        fail(outcome.line, outcome.code)
    console.print(literal(outcome.line), highlight=False)


def _waiting(settings: Settings, short_id: str, line: str) -> None:
    """Say that the canary waits for a second account; there is nothing to watch until then."""
    console.print(literal(f"canary waiting for approval: {line}"), highlight=False)
    console.print(
        f"another account starts it with: captchaops approve {short_id} --model-name "
        f"{settings.model_name}; the production server's breaker then guards it (not watched here)",
        highlight=False,
    )


def _service_act(
    settings: Settings, version: str, outcome: Any, minutes: float, actor: str | None
) -> Any:
    """Have the promotion service make the move a watch left to the caller: end a tripped
    canary, or promote one that passed (--then-promote); the outcome to report."""
    if outcome.left_to_caller == "end":
        body = {"version": version, "reason": f"canary breaker tripped: {outcome.line}"}
        answer = _ask(settings, "/canary/end", body | {"tripped": True}, actor)
        line = f"canary v{version} tripped ({outcome.line}); rolled back: {answer.get('line')}"
        return canary.Outcome(canary.EXIT_TRIPPED, line, outcome.block)
    reason = f"canary passed {minutes:g} min: {canary.describe(outcome.block or {})}"
    asked: dict[str, Any] = {"version": version, "reason": reason, "canary": True}
    answer = _ask(settings, "/promote", asked, actor)
    if answer.get("result") == "waiting":
        short_id = (answer.get("request") or {}).get("short_id")
        line = (
            f"{outcome.line}; @canary stays on v{version} with the server's breaker; waiting for "
            f"approval: request {short_id}; another account approves it with "
            f"`captchaops approve {short_id}`"
        )
        return canary.Outcome(canary.EXIT_CLEAN, line, outcome.block)
    if answer.get("result") != "promoted":
        fail(
            f"the promotion service at {settings.promotions_url} answered "
            f"{answer.get('result')!r}, not a move: check CAPTCHAOPS_PROMOTIONS_URL"
        )
    return canary.Outcome(
        canary.EXIT_CLEAN, f"{outcome.line}; promoted: {answer.get('line')}", outcome.block
    )


def end(settings: Settings, *, reason: str, actor: str | None) -> None:
    """Remove @canary, audited; production is untouched."""
    if settings.promotions_url:
        answer = _ask(settings, "/canary/end", {"reason": reason}, actor)
        if answer.get("result") not in ("ended", "rolled-back"):
            fail(
                f"the promotion service at {settings.promotions_url} answered "
                f"{answer.get('result')!r}, not an end: check CAPTCHAOPS_PROMOTIONS_URL"
            )
        console.print(literal(f"canary ended: {answer.get('line')}"), highlight=False)
        return
    try:
        move = canaries.end_canary(settings, reason=reason or "canary ended by hand", actor=actor)
    except RegistryError as exc:
        fail(str(exc))
    console.print(literal(f"canary ended: {move.line()}"), highlight=False)
