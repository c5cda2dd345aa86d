"""Aliases and version tags: reading them, and the one audited path that moves an alias.

Every move it makes is signed (`registry.signing`) with the promotion key: model servers follow
an alias only where such a signature names the version it holds and that version's network.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import mlflow.artifacts
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from captchaops.data.frozen import DIGEST_TAG
from captchaops.mlflow_scope import client
from captchaops.model.version import META_ARTIFACT, parse_meta
from captchaops.registry.audit import (
    Move,
    Scored,
    abandon_record,
    close_record,
    moves,
    open_record,
)
from captchaops.registry.errors import RegistryError, one_line_errors
from captchaops.registry.lock import promotion_lock
from captchaops.registry.names import PRODUCTION, STAGING, now
from captchaops.registry.signing import (
    PRIVATE_KEY,
    SIGNED_MOVE,
    SignedMove,
    ensure_key,
    new_nonce,
    seal,
)
from captchaops.registry.unaudited import LAST_MOVE, MANAGED_ALIASES
from captchaops.registry.versions import SIGNED_EVALSET, sign_evalset
from captchaops.settings import Settings, load_settings, mask_credentials


def signing_key_dir(settings: Settings) -> Path:
    """The folder of the promotion key this process signs with; a one-line RegistryError where
    it must not sign (a promotion service signs: CAPTCHAOPS_PROMOTIONS_URL) or cannot (the key
    folder is not this account's to use)."""
    if settings.promotions_url:
        raise RegistryError(
            f"this would sign with a local key, but the promotion service at "
            f"{settings.promotions_url} signs for this stack: send the work to it (the command "
            "does so itself), or unset CAPTCHAOPS_PROMOTIONS_URL"
        )
    folder = settings.effective_signing_key_dir
    key = folder / PRIVATE_KEY
    usable = (
        os.access(key, os.R_OK)
        if key.exists()
        else not folder.exists() or os.access(folder, os.W_OK | os.X_OK)
    )
    if not usable:
        raise RegistryError(
            f"the promotion key in {folder} is not this account's to use and no promotion "
            "service is set: set CAPTCHAOPS_PROMOTIONS_URL to the promotion service (`captchaops "
            "up` in team mode prints it), or CAPTCHAOPS_SIGNING_KEY_DIR to a key folder of yours"
        )
    return folder


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


def onnx_digest(client: MlflowClient, model_name: str, version: str) -> str:
    """The ONNX digest a version's meta.json records (two small downloads: MLmodel, meta.json);
    a one-line RegistryError when the version carries none. Model servers check the network
    they load against it, so a signed move names the bytes it vouches for."""
    source = client.get_model_version_download_uri(model_name, version).rstrip("/")
    uri = str(client.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="captchaops-meta-") as tmp:
        try:
            mlmodel = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{source}/MLmodel", dst_path=tmp, tracking_uri=uri
            )
            spec = yaml.safe_load(Path(mlmodel).read_text())
            path = spec["flavors"]["python_function"]["artifacts"][META_ARTIFACT]["path"]
            if not isinstance(path, str) or path.startswith("/") or ".." in path.split("/"):
                raise ValueError("meta path leaves the version")
            meta = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{source}/{path}", dst_path=tmp, tracking_uri=uri
                )
            )
            return parse_meta(meta.read_bytes()).onnx_sha256
        except Exception as exc:  # any store (S3 without credentials, a gone host): unreadable
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise RegistryError(
                f"v{version} of {model_name} has no readable meta.json ({type(exc).__name__}: "
                f"{first}); only versions registered by captchaops can hold a served alias"
            ) from exc


def _digest_or_none(mlflow_client: MlflowClient, name: str, version: str) -> str:
    """The version's ONNX digest; "" for a removal or a version without a readable meta.json
    (a signed move naming no network, which no model server loads)."""
    if not version:
        return ""
    try:
        return onnx_digest(mlflow_client, name, version)
    except RegistryError:
        return ""


def signed_envelope(
    mlflow_client: MlflowClient,
    name: str,
    *,
    alias: str,
    version: str,
    actor: str,
    seq: int,
    evalset_digest: str = "",
    approver: str = "",
    key_dir: Path | None = None,
) -> str:
    """The signed record of `name@alias` holding `version` ("" for a removal), its ONNX digest
    read from the version's meta.json; the key is the settings' promotion key by default."""
    if not evalset_digest:
        evalset_digest = mlflow_client.get_registered_model(name).tags.get(DIGEST_TAG, "")
    record = SignedMove(
        model=name,
        alias=alias,
        version=version,
        onnx_sha256=_digest_or_none(mlflow_client, name, version),
        evalset_sha256=evalset_digest,
        actor=actor,
        approver=approver,
        at=now(),
        seq=seq,
        nonce=new_nonce(),
    )
    return seal(record, ensure_key(key_dir or load_settings().effective_signing_key_dir))


def _write_last_move(mlflow_client: MlflowClient, name: str, move: Move) -> None:
    """The line people read about the alias's last move (servers trust only the signed tag)."""
    mlflow_client.set_registered_model_tag(name, LAST_MOVE + move.alias, move.line()[:4000])


def _signed_tag(mlflow_client: MlflowClient, name: str, alias: str) -> str | None:
    """The alias's signed-move tag as it is now (None: there is none)."""
    return mlflow_client.get_registered_model(name).tags.get(SIGNED_MOVE + alias)


def _restore_signed(
    mlflow_client: MlflowClient, name: str, alias: str, previous: str | None
) -> None:
    """Put the alias's signed-move tag back as it was before a move that failed."""
    if previous is None:
        mlflow_client.delete_registered_model_tag(name, SIGNED_MOVE + alias)
    else:
        mlflow_client.set_registered_model_tag(name, SIGNED_MOVE + alias, previous)


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
    candidate: Scored | None = None,
    champion: Scored | None = None,
    thresholds: dict[str, float] | None = None,
    version_tags: dict[str, dict[str, str]] | None = None,
    decision: str | None = None,
    key_dir: Path | None = None,
    approver: str = "",
    request_id: str = "",
) -> Move:
    """Move an alias under the lock with its audit record: both happen or neither does.

    The audit run is written first and counts only once finished, which happens after the
    alias moved and was read back; any failure in between puts the alias back and marks the
    run FAILED. The model's `signed_move_<alias>` tag (the signed record, also on the audit
    run) is written just before the alias moves and put back if the move fails; stages,
    `version_tags` and the `last_move_<alias>` tag follow a completed move.
    With `check_from`, the move fails if the alias no longer holds `expect_from`. `approver`
    (the second account, signed into the record) and `request_id` answer a request
    (`registry.requests`).
    """
    with promotion_lock(mlflow_client, name, actor):
        current = alias_version(mlflow_client, name, alias)
        if check_from and current != expect_from:
            raise RegistryError(
                f"@{alias} of {name} moved to v{current} while this ran; run the command again"
            )
        seq = last_seq(mlflow_client, name, alias) + 1
        envelope = signed_envelope(
            mlflow_client,
            name,
            alias=alias,
            version=to_version,
            actor=actor,
            seq=seq,
            evalset_digest=next((r.digest for r in (candidate, champion) if r is not None), ""),
            approver=approver,
            key_dir=key_dir,
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
            seq=seq,
            candidate=candidate,
            champion=champion,
            thresholds=thresholds,
            signed=envelope,
            approver=approver,
            request_id=request_id,
        )
        previous = _signed_tag(mlflow_client, name, alias)
        try:
            # Signed first: a server told of the move (webhook) finds the signature already there.
            mlflow_client.set_registered_model_tag(name, SIGNED_MOVE + alias, envelope)
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
                _restore_signed(mlflow_client, name, alias, previous)
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
        _write_last_move(mlflow_client, name, move)
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
    key_dir: Path | None = None,
) -> Move:
    """Delete an alias under the lock with its audit record (to_version empty): both or neither.

    Fails if the alias no longer holds `expect_version`; any failure after the delete puts the
    alias back and marks the run FAILED. The removal is signed like a move (version "").
    """
    with promotion_lock(mlflow_client, name, actor):
        current = alias_version(mlflow_client, name, alias)
        if current != expect_version:
            where = f"v{current}" if current else "nothing"
            raise RegistryError(
                f"@{alias} of {name} holds {where}, not v{expect_version}; "
                "check `captchaops models` and run the command again"
            )
        seq = last_seq(mlflow_client, name, alias) + 1
        envelope = signed_envelope(
            mlflow_client, name, alias=alias, version="", actor=actor, seq=seq, key_dir=key_dir
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
            seq=seq,
            signed=envelope,
        )
        previous = _signed_tag(mlflow_client, name, alias)
        try:
            mlflow_client.set_registered_model_tag(name, SIGNED_MOVE + alias, envelope)
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
            _restore_signed(mlflow_client, name, alias, previous)
            abandon_record(mlflow_client, move.run_id)
            raise
        set_version_tags(mlflow_client, name, version_tags)
        _write_last_move(mlflow_client, name, move)
        return move


def adopt_aliases(
    mlflow_client: MlflowClient, name: str, *, actor: str, key_dir: Path | None = None
) -> list[Move]:
    """Sign where the managed aliases of a model point now, once, each with an audit record
    (decision `adopted`), and its pinned frozen set: an upgraded stack's servers then serve
    what they served and the gate judges on the set it judged on."""
    adopted = []
    with promotion_lock(mlflow_client, name, actor):
        pinned = mlflow_client.get_registered_model(name).tags.get(DIGEST_TAG)
        if pinned:
            envelope = sign_evalset(name, pinned, actor, key_dir)
            mlflow_client.set_registered_model_tag(name, SIGNED_EVALSET, envelope)
        for alias in MANAGED_ALIASES:
            current = alias_version(mlflow_client, name, alias)
            if current is None:
                continue
            seq = last_seq(mlflow_client, name, alias) + 1
            envelope = signed_envelope(
                mlflow_client,
                name,
                alias=alias,
                version=current,
                actor=actor,
                seq=seq,
                key_dir=key_dir,
            )
            move = open_record(
                mlflow_client,
                name,
                alias=alias,
                from_version=current,
                to_version=current,
                actor=actor,
                reason="adopted: signed where the alias pointed when signing was turned on",
                kind="adopt",
                decision="adopted",
                seq=seq,
                signed=envelope,
            )
            try:
                if alias_version(mlflow_client, name, alias) != current:
                    raise RegistryError(
                        f"@{alias} of {name} moved while it was adopted; run the command again"
                    )
                mlflow_client.set_registered_model_tag(name, SIGNED_MOVE + alias, envelope)
                close_record(mlflow_client, move.run_id)
            except BaseException:
                abandon_record(mlflow_client, move.run_id)
                raise
            _write_last_move(mlflow_client, name, move)
            adopted.append(move)
    return adopted


def record_rejection(
    mlflow_client: MlflowClient,
    name: str,
    *,
    version: str,
    reason: str,
    actor: str,
    kind: str,
    alias: str = PRODUCTION,
    candidate: Scored | None = None,
    champion: Scored | None = None,
    thresholds: dict[str, float] | None = None,
    digest: str = "",
    version_tags: dict[str, str] | None = None,
    approver: str = "",
    request_id: str = "",
) -> Move:
    """Audit a refusal to give a version an alias and tag it `validation_status=rejected`
    (`approver` and `request_id`: the gate refused it again when a request was approved)."""
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
        approver=approver,
        request_id=request_id,
    )
    try:
        tags = {"validation_status": "rejected", "rejection_reason": reason[:4000]}
        set_version_tags(mlflow_client, name, {version: tags | (version_tags or {})})
        close_record(mlflow_client, move.run_id)
    except BaseException:
        abandon_record(mlflow_client, move.run_id)
        raise
    return move


def named_version(
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
