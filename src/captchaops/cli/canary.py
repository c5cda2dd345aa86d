"""What `promote --canary` and `rollback --canary` do (the options live on those commands)."""

from __future__ import annotations

from captchaops.cli.base import console, fail
from captchaops.console import literal
from captchaops.settings import Settings

WATCH_MINUTES = 5.0


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
    from captchaops import registry
    from captchaops.decisions import canaries
    from captchaops.decisions import canary_watch as canary

    if detach and then_promote:
        fail("--then-promote needs the watch; leave out --detach")
    if not detach and watch_minutes <= 0:
        fail("--watch takes minutes above 0 (e.g. --watch 5), or pass --detach")
    try:
        move = canaries.start_canary(
            settings,
            percent=percent,
            version=version,
            from_alias=from_alias,
            reason=reason,
            actor=actor,
        )
    except registry.RegistryError as exc:
        fail(str(exc))
    console.print(literal(f"canary: {move.line()}"), highlight=False)
    if detach:
        console.print(
            f"not watching: the production server's breaker stops routing to v{move.to_version} "
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
            move.to_version,
            watch_minutes,
            then_promote=then_promote,
            actor=actor,
            say=lambda line: console.print(line, highlight=False),
        )
    except registry.RegistryError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail(
            f"stopped watching; @canary stays on v{move.to_version} with the server's breaker; "
            "end it with `captchaops rollback --canary`",
            130,
        )
    if outcome.code != canary.EXIT_CLEAN:
        fail(outcome.line, outcome.code)
    console.print(literal(outcome.line), highlight=False)


def end(settings: Settings, *, reason: str, actor: str | None) -> None:
    """Remove @canary, audited; production is untouched."""
    from captchaops import registry
    from captchaops.decisions import canaries

    try:
        move = canaries.end_canary(settings, reason=reason or "canary ended by hand", actor=actor)
    except registry.RegistryError as exc:
        fail(str(exc))
    console.print(literal(f"canary ended: {move.line()}"), highlight=False)
