"""Canaries: a candidate gets a share of production's traffic under `@canary`, and leaves it.

Starting one moves `@canary` through `move_alias` (audited, decision `canary`, the percent in
the record's `threshold_percent` and in the version's `canary_percent` tag, which the production
server reads). Ending one deletes the alias through `remove_alias` (audited, decision
`rolled-back` when the breaker tripped or `ended` otherwise) and sets the tag to "0".
"""

from __future__ import annotations

from mlflow import MlflowClient

from captchaops.decisions.scores import cached_score
from captchaops.evaluation.evalset import Score, ensure_evalset
from captchaops.evaluation.scheme import scheme_of, scheme_refusals
from captchaops.mlflow_scope import client
from captchaops.registry.aliases import (
    alias_version,
    move_alias,
    named_version,
    remove_alias,
    require_model,
    require_version,
    signing_key_dir,
)
from captchaops.registry.audit import Move
from captchaops.registry.errors import RegistryError, one_line_errors
from captchaops.registry.names import PRODUCTION, STAGING, default_actor, now
from captchaops.scheme_names import CANARY, CANARY_MAX_PERCENT, CANARY_PERCENT_TAG
from captchaops.settings import Settings

TRIPPED = "rolled-back"
ENDED = "ended"


def check_percent(percent: int) -> None:
    """Nothing for a share of 1-50 percent; a one-line RegistryError with the fix otherwise."""
    if not 1 <= percent <= CANARY_MAX_PERCENT:
        raise RegistryError(
            f"--canary {percent} is not a share of 1-{CANARY_MAX_PERCENT} percent; "
            "end a canary with `captchaops rollback --canary`"
        )


def check_canary(
    mlflow_client: MlflowClient, settings: Settings, target: str
) -> tuple[str | None, Score, Score]:
    """Every check a canary of `target` must pass before it moves or is requested: @canary's
    holder now, the candidate's and production's scores on the frozen set; a one-line
    RegistryError for no @production, a candidate that is @production, rejected, of another
    scheme or failing on the frozen set, or another version on @canary."""
    name = settings.model_name
    tags = require_version(mlflow_client, name, target)
    production = alias_version(mlflow_client, name, PRODUCTION)
    if production is None:
        raise RegistryError(
            f"{name} has no @production version to share traffic with; "
            "promote one first with `captchaops promote`"
        )
    if production == target:
        raise RegistryError(
            f"v{target} of {name} is @production already; a canary needs another version "
            "(--version N)"
        )
    if tags.get("validation_status") == "rejected":
        why = tags.get("rejection_reason", "no reason recorded")[:200]
        raise RegistryError(
            f"v{target} of {name} was rejected ({why}); train a new candidate or pass --version N"
        )
    current = alias_version(mlflow_client, name, CANARY)
    if current is not None and current != target:
        raise RegistryError(
            f"v{current} of {name} is @canary already; end it first with "
            '`captchaops rollback --canary --reason "..."`'
        )
    scheme = scheme_of(mlflow_client, name, target)
    evalset = ensure_evalset(mlflow_client, settings, scheme=scheme)
    refusals = scheme_refusals(
        target, scheme, production, scheme_of(mlflow_client, name, production), evalset.labels
    )
    if refusals:
        raise RegistryError(refusals[0])
    candidate = cached_score(mlflow_client, settings, target, evalset)
    if not candidate.ok:
        raise RegistryError(
            f"v{target} of {name} fails on the frozen set ({candidate.error}); "
            "it cannot take production traffic"
        )
    return current, candidate, cached_score(mlflow_client, settings, production, evalset)


def start_canary(
    settings: Settings,
    *,
    percent: int,
    version: str | None = None,
    from_alias: str | None = None,
    reason: str = "",
    actor: str | None = None,
    approver: str = "",
    request_id: str = "",
) -> Move:
    """Give the candidate (`version`, or the `from_alias`/@staging one) `@canary` at `percent`.

    Refused in one line: a share outside 1-50, or any refusal of `check_canary`. The candidate
    is scored on the frozen set first (its calibration feeds the live estimate). `approver` and
    `request_id` name the approval of a canary request (`decisions.approval`) in the signed move.
    """
    check_percent(percent)
    actor = actor or default_actor()
    name = settings.model_name
    target = named_version(settings, version=version, alias=from_alias or STAGING)
    with one_line_errors(settings):
        mlflow_client = client(settings)
        current, candidate, champion = check_canary(mlflow_client, settings, target)
        return move_alias(
            mlflow_client,
            name,
            alias=CANARY,
            to_version=target,
            expect_from=current,
            reason=reason or f"canary: {percent}% of production's traffic",
            actor=actor,
            kind="canary",
            decision="canary",
            candidate=candidate,
            champion=champion,
            thresholds={"percent": float(percent)},
            version_tags={
                target: {CANARY_PERCENT_TAG: str(percent), "canary_started_at": now()},
            },
            key_dir=signing_key_dir(settings),
            approver=approver,
            request_id=request_id,
        )


def end_canary(
    settings: Settings,
    *,
    reason: str,
    actor: str | None = None,
    version: str | None = None,
    tripped: bool = False,
) -> Move:
    """Remove `@canary` (if it still holds `version`, when given), audited; a tripped canary's
    version is also marked rejected, so neither the gate nor a canary takes it again."""
    actor = actor or default_actor()
    name = settings.model_name
    with one_line_errors(settings):
        mlflow_client = client(settings)
        require_model(mlflow_client, settings)
        current = alias_version(mlflow_client, name, CANARY)
        if current is None:
            raise RegistryError(f"no version of {name} has @canary; there is no canary to end")
        if version is not None and current != version:
            raise RegistryError(
                f"@canary of {name} moved to v{current} while this ran; "
                "check `captchaops models` and end it with `captchaops rollback --canary`"
            )
        stamp = {
            CANARY_PERCENT_TAG: "0",
            "canary_ended_at": now(),
            "canary_end_reason": reason[:4000],
        }
        if tripped:
            stamp |= {"validation_status": "rejected", "rejection_reason": reason[:4000]}
        return remove_alias(
            mlflow_client,
            name,
            alias=CANARY,
            expect_version=current,
            reason=reason,
            actor=actor,
            kind="canary",
            decision=TRIPPED if tripped else ENDED,
            version_tags={current: stamp},
            key_dir=signing_key_dir(settings),
        )


def end_canary_of(settings: Settings, version: str, *, reason: str, actor: str | None) -> None:
    """End `@canary` once its version holds `@production` (a canary's promotion); nothing when
    `@canary` holds another version or none."""
    with one_line_errors(settings):
        on_canary = alias_version(client(settings), settings.model_name, CANARY)
    if on_canary == version:
        end_canary(
            settings, reason=f"promoted to @production: {reason}", actor=actor, version=version
        )
