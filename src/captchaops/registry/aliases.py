"""Aliases and version tags: reading them, and the one audited path that moves an alias."""

from __future__ import annotations

import warnings

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from captchaops.evaluation.evalset import Score
from captchaops.mlflow_scope import client
from captchaops.registry.audit import Move, abandon_record, close_record, moves, open_record
from captchaops.registry.errors import RegistryError, one_line_errors
from captchaops.registry.lock import promotion_lock
from captchaops.registry.names import PRODUCTION, STAGING
from captchaops.settings import Settings, mask_credentials


def alias_version(mlflow_client: MlflowClient, name: str, alias: str) -> str | None:
    """The version holding an alias of a model, or None."""
    try:
        return str(mlflow_client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            return None
        raise


def require_model(mlflow_client: MlflowClient, settings: Settings) -> None:
    """Nothing if the settings' model is registered; a one-line RegistryError if not."""
    try:
        mlflow_client.get_registered_model(settings.model_name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise RegistryError(
            f"no registered model {settings.model_name!r} on {settings.effective_tracking_uri}; "
            "train one with `captchaops train`"
        ) from exc


def require_version(mlflow_client: MlflowClient, name: str, version: str) -> dict[str, str]:
    """The tags of an existing version; a one-line RegistryError if there is no such version."""
    try:
        return dict(mlflow_client.get_model_version(name, version).tags)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise RegistryError(
            f"{name} has no version {version}; see `captchaops models` for the versions"
        ) from exc


def set_version_tags(
    mlflow_client: MlflowClient, name: str, tags: dict[str, dict[str, str]] | None
) -> None:
    """Write tags on versions: {version: {key: value}}."""
    for version, values in (tags or {}).items():
        for key, value in values.items():
            mlflow_client.set_model_version_tag(name, version, key, value)


def sync_stages(mlflow_client: MlflowClient, name: str) -> None:
    """Keep the deprecated Production/Staging stages in step with the aliases."""
    production = alias_version(mlflow_client, name, PRODUCTION)
    staging = alias_version(mlflow_client, name, STAGING)
    wanted = {production: "Production"} if production else {}
    if staging and staging != production:
        wanted[staging] = "Staging"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for mv in mlflow_client.search_model_versions(f"name='{name}'"):
            version = str(mv.version)
            target = wanted.get(version)
            if target and mv.current_stage != target:
                mlflow_client.transition_model_version_stage(name, version, target)
            elif not target and mv.current_stage in ("Production", "Staging"):
                mlflow_client.transition_model_version_stage(name, version, "Archived")


def _decision(alias: str, kind: str) -> str:
    if kind == "rollback":
        return "rolled-back"
    return "promoted" if alias == PRODUCTION else "staged"


def _undo(mlflow_client: MlflowClient, name: str, alias: str, move: Move) -> None:
    """Put the alias back where the move found it (if it still holds the move's version)."""
    if alias_version(mlflow_client, name, alias) == move.to_version:
        if move.from_version is None:
            mlflow_client.delete_registered_model_alias(name, alias)
        else:
            mlflow_client.set_registered_model_alias(name, alias, move.from_version)
    abandon_record(mlflow_client, move.run_id)


def move_alias(
    mlflow_client: MlflowClient,
    name: str,
    *,
    alias: str,
    to_version: str,
    expect_from: str | None,
    reason: str,
    actor: str,
    kind: str,
    check_from: bool = True,
    candidate: Score | None = None,
    champion: Score | None = None,
    thresholds: dict[str, float] | None = None,
    version_tags: dict[str, dict[str, str]] | None = None,
    decision: str | None = None,
) -> Move:
    """Move an alias under the lock with its audit record: both happen or neither does.

    The audit run is written first and counts only once finished, which happens after the
    alias moved and was read back; any failure in between puts the alias back and marks the
    run FAILED. Stages, `version_tags` and the model's `last_move_<alias>` tag follow.
    With `check_from`, the move fails if the alias no longer holds `expect_from`.
    """
    with promotion_lock(mlflow_client, name, actor):
        current = alias_version(mlflow_client, name, alias)
        if check_from and current != expect_from:
            raise RegistryError(
                f"@{alias} of {name} moved to v{current} while this ran; run the command again"
            )
        move = open_record(
            mlflow_client,
            name,
            alias=alias,
            from_version=current,
            to_version=to_version,
            actor=actor,
            reason=reason,
            kind=kind,
            decision=decision or _decision(alias, kind),
            seq=last_seq(mlflow_client, name, alias) + 1,
            candidate=candidate,
            champion=champion,
            thresholds=thresholds,
        )
        try:
            mlflow_client.set_registered_model_alias(name, alias, to_version)
            if alias_version(mlflow_client, name, alias) != to_version:
                raise RegistryError(
                    f"@{alias} of {name} was changed outside captchaops during the move; "
                    "check `captchaops models` and run the command again"
                )
            close_record(mlflow_client, move.run_id)
        except BaseException as exc:
            try:
                _undo(mlflow_client, name, alias, move)
            except MlflowException as undo:
                why = mask_credentials(f"{exc} / {undo}".splitlines()[0])[:300]
                raise RegistryError(
                    f"moving @{alias} of {name} to v{to_version} failed and so did putting it "
                    f"back ({why}); check `captchaops models` and the tracking server, then "
                    f"move @{alias} back to v{current} with `captchaops promote`"
                ) from exc
            raise
        sync_stages(mlflow_client, name)
        set_version_tags(mlflow_client, name, version_tags)
        mlflow_client.set_registered_model_tag(name, f"last_move_{alias}", move.line()[:4000])
        return move


def assign_alias(
    mlflow_client: MlflowClient, name: str, alias: str, version: str, *, reason: str, actor: str
) -> Move:
    """Point an alias at a version whatever it holds now, audited: for setting up a stack."""
    return move_alias(
        mlflow_client,
        name,
        alias=alias,
        to_version=version,
        expect_from=None,
        check_from=False,
        reason=reason,
        actor=actor,
        kind="manual",
    )


def remove_alias(
    mlflow_client: MlflowClient,
    name: str,
    *,
    alias: str,
    expect_version: str,
    reason: str,
    actor: str,
    kind: str,
    decision: str,
    version_tags: dict[str, dict[str, str]] | None = None,
) -> Move:
    """Delete an alias under the lock with its audit record (to_version empty): both or neither.

    Fails if the alias no longer holds `expect_version`; any failure after the delete puts the
    alias back and marks the run FAILED.
    """
    with promotion_lock(mlflow_client, name, actor):
        current = alias_version(mlflow_client, name, alias)
        if current != expect_version:
            where = f"v{current}" if current else "nothing"
            raise RegistryError(
                f"@{alias} of {name} holds {where}, not v{expect_version}; "
                "check `captchaops models` and run the command again"
            )
        move = open_record(
            mlflow_client,
            name,
            alias=alias,
            from_version=current,
            to_version="",
            actor=actor,
            reason=reason,
            kind=kind,
            decision=decision,
            seq=last_seq(mlflow_client, name, alias) + 1,
        )
        try:
            mlflow_client.delete_registered_model_alias(name, alias)
            if alias_version(mlflow_client, name, alias) is not None:
                raise RegistryError(
                    f"@{alias} of {name} was set again outside captchaops during the removal; "
                    "check `captchaops models` and run the command again"
                )
            close_record(mlflow_client, move.run_id)
        except BaseException:
            if alias_version(mlflow_client, name, alias) is None:
                mlflow_client.set_registered_model_alias(name, alias, expect_version)
            abandon_record(mlflow_client, move.run_id)
            raise
        set_version_tags(mlflow_client, name, version_tags)
        mlflow_client.set_registered_model_tag(name, f"last_move_{alias}", move.line()[:4000])
        return move


def record_rejection(
    mlflow_client: MlflowClient,
    name: str,
    *,
    version: str,
    reason: str,
    actor: str,
    kind: str,
    alias: str = PRODUCTION,
    candidate: Score | None = None,
    champion: Score | None = None,
    thresholds: dict[str, float] | None = None,
    digest: str = "",
    version_tags: dict[str, str] | None = None,
) -> Move:
    """Audit a refusal to give a version an alias and tag it `validation_status=rejected`."""
    move = open_record(
        mlflow_client,
        name,
        alias=alias,
        from_version=alias_version(mlflow_client, name, alias),
        to_version=version,
        actor=actor,
        reason=reason,
        kind=kind,
        decision="rejected",
        seq=last_seq(mlflow_client, name, alias),
        candidate=candidate,
        champion=champion,
        thresholds=thresholds,
        digest=digest,
    )
    try:
        tags = {"validation_status": "rejected", "rejection_reason": reason[:4000]}
        set_version_tags(mlflow_client, name, {version: tags | (version_tags or {})})
        close_record(mlflow_client, move.run_id)
    except BaseException:
        abandon_record(mlflow_client, move.run_id)
        raise
    return move


def resolve(
    settings: Settings,
    *,
    version: str | None = None,
    alias: str | None = None,
    mlflow_client: MlflowClient | None = None,
) -> str:
    """The version number named directly or through an alias; one-line error if there is none.

    Reads through `mlflow_client` when one is given, else through a client of its own.
    """
    with one_line_errors(settings):
        mlflow_client = mlflow_client or client(settings)
        require_model(mlflow_client, settings)
        if version is not None:
            require_version(mlflow_client, settings.model_name, version)
            return version
        found = alias_version(mlflow_client, settings.model_name, alias or STAGING)
        if found is None:
            raise RegistryError(
                f"no version of {settings.model_name} has alias @{alias or STAGING}; "
                "train one with `captchaops train` or pass --version N"
            )
        return found


def resolve_alias(settings: Settings, alias: str) -> str | None:
    """The version holding an alias, or None."""
    with one_line_errors(settings):
        return alias_version(client(settings), settings.model_name, alias)


def last_seq(mlflow_client: MlflowClient, name: str, alias: str) -> int:
    """The sequence number of the alias's last audited move (0 before any): a move takes the
    next one, a refusal records the one it saw."""
    return max((m.seq for m in moves(mlflow_client, name, alias)), default=0)
