"""Registered models and their versions: creating them, and pinning a model's frozen set (signed,
so the gate can tell the set made with `evalset` from one an editor put in its place)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from captchaops.data.frozen import DIGEST_TAG
from captchaops.registry.signing import (
    SignedMove,
    Untrusted,
    ensure_key,
    load_public_key,
    new_nonce,
    open_seal,
    seal,
)
from captchaops.settings import load_settings

SIGNED_EVALSET = "signed_evalset"
"""Registered-model tag: the promotion key's signature on the pinned frozen set's digest."""
EVALSET = "@evalset"
"""The record's alias field for a frozen-set pin (no alias can be named so: '@' is refused)."""


def ensure_model(mlflow_client: MlflowClient, name: str) -> None:
    """Create the registered model `name` unless it exists (safe when two processes race)."""
    try:
        mlflow_client.get_registered_model(name)
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def register_version(client: MlflowClient, model_name: str, model_uri: str, run_id: str) -> str:
    """Create a version of `model_name` from a logged model (`ModelInfo.model_uri`), creating the registered model if missing; returns the version number."""
    ensure_model(client, model_name)
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = client.create_model_version(model_name, model_uri, run_id, model_id=model_id)
    return str(version.version)


def copy_version(client: MlflowClient, model_name: str, version: str) -> str:
    """Register an existing version's logged model again as a new version; returns its number."""
    source = client.get_model_version(model_name, version)
    return register_version(client, model_name, str(source.source), str(source.run_id))


def pin_evalset(
    client: MlflowClient,
    model_name: str,
    digest: str,
    seed: int,
    kind: str,
    *,
    actor: str = "",
    key_dir: Path | None = None,
) -> None:
    """Judge `model_name` on the frozen set with this digest from now on (creating the model);
    the pin is signed with the promotion key (`signed_evalset`), which the gate checks."""
    ensure_model(client, model_name)
    client.set_registered_model_tag(
        model_name, SIGNED_EVALSET, sign_evalset(model_name, digest, actor, key_dir)
    )
    client.set_registered_model_tag(model_name, DIGEST_TAG, digest)
    client.set_registered_model_tag(model_name, "evalset_seed", str(seed))
    client.set_registered_model_tag(model_name, "evalset_kind", kind)


def sign_evalset(model_name: str, digest: str, actor: str = "", key_dir: Path | None = None) -> str:
    """The signed record that `model_name` is judged on the frozen set with this digest."""
    record = SignedMove(
        model=model_name,
        alias=EVALSET,
        version="",
        onnx_sha256="",
        evalset_sha256=digest,
        actor=actor,
        approver="",
        at=datetime.now(UTC).isoformat(timespec="seconds"),
        seq=0,
        nonce=new_nonce(),
    )
    return seal(record, ensure_key(key_dir or load_settings().effective_signing_key_dir))


def evalset_problem(tags: dict[str, str], model_name: str, key_path: Path) -> str | None:
    """Why the frozen set a model's tags pin is not the one signed when it was made, or None."""
    pinned = tags.get(DIGEST_TAG, "")
    try:
        signed = open_seal(
            tags.get(SIGNED_EVALSET, ""), load_public_key(key_path), model=model_name, alias=EVALSET
        )
    except Untrusted as exc:
        why = str(exc)
    else:
        if signed.evalset_sha256 == pinned:
            return None
        why = f"the signed set is {signed.evalset_sha256[:12]}"
    return (
        f"the frozen set {pinned[:12] or '(none)'} of {model_name} is not the one signed when it "
        f"was made ({why}); make it again with `captchaops evalset --replace`, or have an admin "
        "sign the current one with `captchaops promotions adopt`"
    )
