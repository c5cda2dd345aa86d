"""Promotion, rollback and staging: the alias moves they make, each through `move_alias`.

The gate (`decisions.gate`) decides whether a trained version reaches the staging floor;
`stage_version` writes what it decided. Every write goes through the registry.
"""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient

from captchaops.decisions.scores import scores
from captchaops.evaluation.evalset import Score
from captchaops.mlflow_scope import client
from captchaops.registry.aliases import (
    alias_version,
    move_alias,
    named_version,
    record_rejection,
    require_model,
    require_version,
    set_version_tags,
    signing_key_dir,
)
from captchaops.registry.audit import Move, moves, production_stack
from captchaops.registry.errors import RegistryError, one_line_errors
from captchaops.registry.names import PRODUCTION, STAGING, client_actor, default_actor, now
from captchaops.registry.versions import evalset_problem
from captchaops.settings import Settings


def to_production(
    mlflow_client: MlflowClient,
    name: str,
    version: str,
    *,
    expect_from: str | None,
    reason: str,
    actor: str,
    kind: str,
    candidate: Score | None,
    champion: Score | None,
    thresholds: dict[str, float],
    validated: bool = False,
    key_dir: Path | None = None,
    approver: str = "",
    request_id: str = "",
) -> Move:
    """Move @production to a version and stamp it; the one call behind every promotion
    (`approver` and `request_id`: the second account and the request it approved)."""
    at = now()
    stamp = {"validation_status": "validated", "validated_at": at} if validated else {}
    stamp |= {"promoted_at": at, "promoted_by": actor, "promotion_reason": reason[:4000]}
    return move_alias(
        mlflow_client,
        name,
        alias=PRODUCTION,
        to_version=version,
        expect_from=expect_from,
        reason=reason,
        actor=actor,
        kind=kind,
        candidate=candidate,
        champion=champion,
        thresholds=thresholds,
        version_tags={version: stamp},
        key_dir=key_dir,
        approver=approver,
        request_id=request_id,
    )


def check_promotion(
    mlflow_client: MlflowClient, settings: Settings, target: str, *, force: bool
) -> tuple[str | None, Score, Score | None]:
    """(the version @production holds now, the target's score, that version's score) when a
    person may move @production to `target`; a one-line RegistryError when not (already there,
    rejected or failing without `force`, a frozen set other than the signed one)."""
    name = settings.model_name
    tags = require_version(mlflow_client, name, target)
    current = alias_version(mlflow_client, name, PRODUCTION)
    if current == target:
        raise RegistryError(f"v{target} of {name} is already @production; nothing to do")
    if tags.get("validation_status") == "rejected" and not force:
        why = tags.get("rejection_reason", "no reason recorded")
        raise RegistryError(
            f"v{target} of {name} was rejected ({why[:200]}); pass --force to promote it anyway"
        )
    candidate, champion = scores(mlflow_client, settings, target, current)
    require_signed_evalset(mlflow_client, settings)
    if not candidate.ok and not force:
        raise RegistryError(
            f"v{target} of {name} fails on the frozen set ({candidate.error}); "
            "fix the model or pass --force"
        )
    return current, candidate, champion


def promote(
    settings: Settings,
    *,
    version: str | None = None,
    from_alias: str | None = None,
    reason: str,
    actor: str | None = None,
    force: bool = False,
    approver: str = "",
    request_id: str = "",
) -> Move:
    """A person moves @production to a version (or to the @staging one), scored and audited."""
    actor = actor or settings.tracking_username or default_actor()
    name = settings.model_name
    target = named_version(settings, version=version, alias=from_alias)
    with one_line_errors(settings):
        mlflow_client = client(settings)
        current, candidate, champion = check_promotion(mlflow_client, settings, target, force=force)
        return to_production(
            mlflow_client,
            name,
            target,
            expect_from=current,
            reason=reason,
            actor=actor,
            kind="manual",
            candidate=candidate,
            champion=champion,
            thresholds={"forced": float(force)},
            key_dir=signing_key_dir(settings),
            approver=approver,
            request_id=request_id,
        )


def require_signed_evalset(mlflow_client: MlflowClient, settings: Settings) -> None:
    """Nothing when the model's pinned frozen set is the one signed when it was made; else a
    one-line RegistryError (an editor may have put another set in its place)."""
    name = settings.model_name
    tags = dict(mlflow_client.get_registered_model(name).tags)
    problem = evalset_problem(tags, name, settings.effective_signing_public_key)
    if problem:
        raise RegistryError(problem)


def _rollback_target(stack: list[str], current: str | None, to: str | None, name: str) -> str:
    if not stack or current is None:
        raise RegistryError(
            f"{name} has no audited production history to roll back; "
            "use `captchaops promote --version N`"
        )
    if stack[-1] != current:
        raise RegistryError(
            f"@production of {name} is v{current} but the audit trail ends at v{stack[-1]} "
            "(moved outside captchaops); use `captchaops promote --version N`"
        )
    earlier = stack[:-1]
    if to is None:
        if not earlier:
            raise RegistryError(
                f"v{current} is the first audited production version of {name}; "
                "there is nothing earlier to roll back to"
            )
        return earlier[-1]
    if to == current:
        raise RegistryError(f"v{to} of {name} is already @production; nothing to do")
    if to not in earlier:
        raise RegistryError(
            f"v{to} of {name} was never @production before v{current}; "
            f"use `captchaops promote --version {to}`"
        )
    return to


def rollback_target(
    mlflow_client: MlflowClient, settings: Settings, to: str | None
) -> tuple[str | None, str]:
    """(the version @production holds now, the version a rollback moves it to); a one-line
    RegistryError when there is none to go back to."""
    name = settings.model_name
    require_model(mlflow_client, settings)
    if to is not None:
        require_version(mlflow_client, name, to)
    current = alias_version(mlflow_client, name, PRODUCTION)
    stack = production_stack(moves(mlflow_client, name, PRODUCTION))
    return current, _rollback_target(stack, current, to, name)


def rollback(
    settings: Settings,
    *,
    to: str | None = None,
    reason: str = "",
    actor: str | None = None,
    approver: str = "",
    request_id: str = "",
) -> Move:
    """Move @production back to the previous audited production version (or to `to`)."""
    actor = actor or settings.tracking_username or default_actor()
    name = settings.model_name
    with one_line_errors(settings):
        mlflow_client = client(settings)
        current, target = rollback_target(mlflow_client, settings, to)
        candidate, champion = scores(mlflow_client, settings, target, current)
        require_signed_evalset(mlflow_client, settings)
        why = reason or f"rollback from v{current}"
        return move_alias(
            mlflow_client,
            name,
            alias=PRODUCTION,
            to_version=target,
            expect_from=current,
            reason=why,
            actor=actor,
            kind="rollback",
            candidate=candidate,
            champion=champion,
            version_tags={
                str(current): {
                    "validation_status": "rejected",
                    "rejection_reason": f"rolled back by {actor}: {why}"[:4000],
                },
                target: {
                    "promoted_at": now(),
                    "promoted_by": actor,
                    "promotion_reason": why[:4000],
                },
            },
            key_dir=signing_key_dir(settings),
            approver=approver,
            request_id=request_id,
        )


def logged_accuracy(mlflow_client: MlflowClient, name: str, version: str) -> float:
    """The test sequence accuracy the run that registered a version logged (`test_seq_acc`):
    what the staging floor judges, read from the registry, never from whoever asks; a one-line
    RegistryError when the version is rejected or its run logged none."""
    tags = require_version(mlflow_client, name, version)
    if tags.get("validation_status") == "rejected":
        why = tags.get("rejection_reason", "no reason recorded")[:200]
        raise RegistryError(f"v{version} of {name} was rejected ({why}); train a new candidate")
    run_id = mlflow_client.get_model_version(name, version).run_id
    found = mlflow_client.get_run(run_id).data.metrics.get("test_seq_acc") if run_id else None
    if found is None:
        raise RegistryError(
            f"v{version} of {name} has no test accuracy logged by its run; only versions that "
            "`captchaops train` or `register` made can be staged"
        )
    return float(found)


def stage_version(
    mlflow_client: MlflowClient,
    name: str,
    version: str,
    *,
    accuracy: float,
    rejection: str | None,
    floor: float,
    actor: str | None = None,
    key_dir: Path | None = None,
) -> None:
    """Write the staging decision `decisions.gate.stage_candidate` made for a trained version:
    @staging (pending) when `rejection` is None, else the audited rejection.

    Tags the version's test sequence accuracy first; both outcomes are audited.
    """
    actor = actor or client_actor(mlflow_client)
    set_version_tags(mlflow_client, name, {version: {"test_seq_acc": f"{accuracy:.4f}"}})
    if rejection is None:
        move_alias(
            mlflow_client,
            name,
            alias=STAGING,
            to_version=version,
            expect_from=None,
            check_from=False,
            reason=f"trained: test sequence accuracy {accuracy:.4f} reaches the staging floor {floor}",
            actor=actor,
            kind="training",
            thresholds={"floor": floor},
            version_tags={version: {"validation_status": "pending"}},
            key_dir=key_dir,
        )
        return
    record_rejection(
        mlflow_client,
        name,
        alias=STAGING,
        version=version,
        reason=rejection,
        actor=actor,
        kind="training",
        thresholds={"floor": floor},
    )
