"""Registry: versions and aliases, promotion, rollback, the audit trail and stage compatibility."""

from __future__ import annotations

import getpass
import random
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from captchaops.evalset import (
    EvalSetError,
    Score,
    cached_score,
    client_for,
    ensure_evalset,
)
from captchaops.settings import Settings

AUDIT_EXPERIMENT = "text-captcha-promotions"
PRODUCTION = "production"
STAGING = "staging"
STAGES = {PRODUCTION: "Production", STAGING: "Staging"}
LOCK_SUFFIX = ".promotion-lock"
LOCK_TIMEOUT_S = 120.0
LOCK_STALE_S = 900.0
MOVES = ("promoted", "rolled-back")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class RegistryError(Exception):
    """A registry problem a user can fix; the message is one line with the fix. Nothing changed."""


@dataclass(frozen=True)
class Move:
    """One audited alias decision: a promotion, a rollback or a gate rejection."""

    alias: str
    from_version: str | None
    to_version: str
    actor: str
    reason: str
    kind: str
    decision: str
    at: str
    run_id: str
    seq: int

    def line(self) -> str:
        """The move as one human line."""
        source = f"v{self.from_version}" if self.from_version else "nothing"
        return (
            f"@{self.alias} {source} -> v{self.to_version} ({self.decision}) by {self.actor} "
            f"at {self.at}: {self.reason}"
        )


@dataclass(frozen=True)
class VersionRow:
    """What `captchaops models` shows about one version."""

    version: str
    aliases: list[str]
    stage: str
    status: str
    created: str
    test_seq_acc: float | None
    eval_seq_acc: float | None
    eval_cer: float | None
    note: str


@dataclass(frozen=True)
class Listing:
    """All versions of the registered model, newest first, and each alias's last audited move."""

    name: str
    rows: list[VersionRow]
    last_moves: dict[str, str]


def check_model_name(name: str) -> str:
    """The name of a scheme's registered model, if usable; a one-line `RegistryError` if not."""
    if not MODEL_NAME.fullmatch(name) or name.endswith(LOCK_SUFFIX):
        raise RegistryError(
            f"model name {name!r} is not usable; name a scheme with 1-100 letters, digits, "
            "'-', '_' or '.', starting with a letter or digit (e.g. --model-name bank-captcha)"
        )
    return name


def default_actor() -> str:
    """Who is acting when nobody says: the login name of this process."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@contextmanager
def one_line_errors(settings: Settings) -> Iterator[None]:
    """Turn tracking-server and frozen-set failures into one-line `RegistryError`s."""
    try:
        yield
    except EvalSetError as exc:
        raise RegistryError(str(exc)) from exc
    except MlflowException as exc:
        first = (str(exc).strip().splitlines() or ["unknown error"])[0][:300]
        if "503" in first:
            raise RegistryError(
                f"tracking server {settings.effective_tracking_uri} answers 503 (unavailable): "
                "its disk may be full or its database locked; check free space under its home "
                "and `captchaops logs tracking`"
            ) from exc
        raise RegistryError(
            f"tracking server {settings.effective_tracking_uri} failed: {first}; "
            "check it is up with `captchaops status`"
        ) from exc


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            return None
        raise


def _require_model(client: MlflowClient, settings: Settings) -> None:
    try:
        client.get_registered_model(settings.model_name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise RegistryError(
            f"no registered model {settings.model_name!r} on {settings.effective_tracking_uri}; "
            "train one with `captchaops train`"
        ) from exc


def _require_version(client: MlflowClient, name: str, version: str) -> dict[str, str]:
    try:
        return dict(client.get_model_version(name, version).tags)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise RegistryError(
            f"{name} has no version {version}; see `captchaops models` for the versions"
        ) from exc


def _lock_name(name: str) -> str:
    return f"{name}{LOCK_SUFFIX}"


@contextmanager
def promotion_lock(
    client: MlflowClient, name: str, actor: str, timeout_s: float = LOCK_TIMEOUT_S
) -> Iterator[None]:
    """Serialize alias moves across processes and machines with a lock row on the tracking server.

    Creating a registered model is atomic (its name is the primary key), so the
    process whose create succeeds holds the lock; the others retry until it is
    deleted. A lock older than LOCK_STALE_S (a crashed holder) is broken.
    """
    lock = _lock_name(name)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={"holder": actor, "acquired_at": _now(), "kind": "promotion-lock"},
                description=f"held while captchaops moves an alias of {name}",
            )
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            continue
        age_s = time.time() - held.creation_timestamp / 1000
        if age_s > LOCK_STALE_S:
            _release(client, lock)
            continue
        if time.monotonic() > deadline:
            raise RegistryError(
                f"another promotion of {name} holds the lock (by {held.tags.get('holder')}, "
                f"{age_s:.0f}s ago); wait and retry"
            )
        time.sleep(0.1 + random.random() * 0.3)
    try:
        yield
    finally:
        _release(client, lock)


def _release(client: MlflowClient, lock: str) -> None:
    try:
        client.delete_registered_model(lock)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def sync_stages(client: MlflowClient, name: str) -> None:
    """Keep the deprecated Production/Staging stages in step with the aliases."""
    production = _alias_version(client, name, PRODUCTION)
    staging = _alias_version(client, name, STAGING)
    wanted = {production: "Production"} if production else {}
    if staging and staging != production:
        wanted[staging] = "Staging"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for mv in client.search_model_versions(f"name='{name}'"):
            version = str(mv.version)
            target = wanted.get(version)
            if target and mv.current_stage != target:
                client.transition_model_version_stage(name, version, target)
            elif not target and mv.current_stage in ("Production", "Staging"):
                client.transition_model_version_stage(name, version, "Archived")


def _audit_experiment(client: MlflowClient) -> str:
    experiment = client.get_experiment_by_name(AUDIT_EXPERIMENT)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(client.create_experiment(AUDIT_EXPERIMENT, tags={"kind": "promotion"}))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        existing = client.get_experiment_by_name(AUDIT_EXPERIMENT)
        if existing is None:
            raise
        return str(existing.experiment_id)


def _move_of(run: object) -> Move:
    data = run.data  # type: ignore[attr-defined]
    params, tags = data.params, data.tags
    return Move(
        alias=tags["alias"],
        from_version=params.get("from_version") or None,
        to_version=params["to_version"],
        actor=params.get("actor", ""),
        reason=tags.get("reason", params.get("reason", "")),
        kind=params.get("kind", ""),
        decision=tags["decision"],
        at=params.get("at", ""),
        run_id=run.info.run_id,  # type: ignore[attr-defined]
        seq=int(params.get("seq", "0")),
    )


def _audit(client: MlflowClient, name: str, alias: str) -> list[Move]:
    experiment = client.get_experiment_by_name(AUDIT_EXPERIMENT)
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.model_name = '{name}' and tags.alias = '{alias}' and attributes.status = 'FINISHED'",
        max_results=5000,
    )
    return sorted((_move_of(r) for r in runs), key=lambda m: (m.seq, m.at))


def history(settings: Settings, alias: str = PRODUCTION) -> list[Move]:
    """Every audited decision about an alias, oldest first."""
    with one_line_errors(settings):
        return _audit(client_for(settings), settings.model_name, alias)


def production_stack(moves: list[Move]) -> list[str]:
    """Replay audited moves: promotions push a version, a rollback pops back to its target."""
    stack: list[str] = []
    for move in moves:
        if move.decision not in MOVES:
            continue
        if move.kind == "rollback" and move.to_version in stack:
            last = len(stack) - 1 - stack[::-1].index(move.to_version)
            del stack[last + 1 :]
        else:
            stack.append(move.to_version)
    return stack


def _write_audit(
    client: MlflowClient,
    settings: Settings,
    *,
    alias: str,
    from_version: str | None,
    to_version: str,
    actor: str,
    reason: str,
    kind: str,
    decision: str,
    seq: int,
    candidate: Score | None,
    champion: Score | None,
    thresholds: dict[str, float],
    digest: str = "",
) -> str:
    """Open the audit run of a decision (left RUNNING; the caller finishes it)."""
    at = _now()
    source = f"v{from_version}" if from_version else "none"
    run = client.create_run(
        _audit_experiment(client),
        run_name=f"{decision} {settings.model_name}@{alias} {source}->v{to_version}",
        tags={
            "kind": "promotion",
            "model_name": settings.model_name,
            "alias": alias,
            "decision": decision,
            "reason": reason[:4000],
            "mlflow.user": actor,
            "mlflow.note.content": reason,
        },
    )
    params = {
        "alias": alias,
        "from_version": from_version or "",
        "to_version": to_version,
        "actor": actor,
        "reason": reason[:500],
        "kind": kind,
        "decision": decision,
        "at": at,
        "seq": str(seq),
        "evalset_digest": next((r.digest for r in (candidate, champion) if r is not None), digest),
    }
    params.update({f"threshold_{k}": str(v) for k, v in thresholds.items()})
    metrics = {}
    for prefix, result in (("candidate", candidate), ("champion", champion)):
        if result is not None:
            metrics.update(result.metrics(prefix))
            if result.error:
                params[f"{prefix}_error"] = result.error[:500]
    now_ms = int(time.time() * 1000)
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(k, v, now_ms, 0) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag("at", at)],
    )
    return str(run.info.run_id)


def move_alias(
    settings: Settings,
    *,
    alias: str,
    to_version: str,
    expect_from: str | None,
    reason: str,
    actor: str,
    kind: str,
    candidate: Score | None,
    champion: Score | None,
    thresholds: dict[str, float] | None = None,
    version_tags: dict[str, dict[str, str]] | None = None,
) -> Move:
    """Move an alias under the lock, audit it, sync stages and verify; fails if the alias moved meanwhile."""
    name = settings.model_name
    decision = "rolled-back" if kind == "rollback" else "promoted"
    with one_line_errors(settings):
        client = client_for(settings)
        with promotion_lock(client, name, actor):
            current = _alias_version(client, name, alias)
            if current != expect_from:
                raise RegistryError(
                    f"@{alias} of {name} moved to v{current} while this ran; run the command again"
                )
            moves = _audit(client, name, alias)
            seq = max((m.seq for m in moves), default=0) + 1
            run_id = _write_audit(
                client,
                settings,
                alias=alias,
                from_version=current,
                to_version=to_version,
                actor=actor,
                reason=reason,
                kind=kind,
                decision=decision,
                seq=seq,
                candidate=candidate,
                champion=champion,
                thresholds=thresholds or {},
            )
            try:
                client.set_registered_model_alias(name, alias, to_version)
                sync_stages(client, name)
                for version, tags in (version_tags or {}).items():
                    for key, value in tags.items():
                        client.set_model_version_tag(name, version, key, value)
                if _alias_version(client, name, alias) != to_version:
                    raise RegistryError(
                        f"@{alias} of {name} was changed outside captchaops during the move; "
                        "check `captchaops models` and run the command again"
                    )
            except BaseException:
                client.set_terminated(run_id, "FAILED")
                raise
            move = Move(
                alias, current, to_version, actor, reason, kind, decision, _now(), run_id, seq
            )
            client.set_registered_model_tag(name, f"last_move_{alias}", move.line()[:4000])
            client.set_terminated(run_id, "FINISHED")
            return move


def record_rejection(
    settings: Settings,
    *,
    version: str,
    candidate: Score | None,
    champion: Score | None,
    reason: str,
    actor: str,
    thresholds: dict[str, float],
    digest: str = "",
) -> Move:
    """Audit a gate refusal of a version, scored or not, and tag it `validation_status=rejected`."""
    name = settings.model_name
    with one_line_errors(settings):
        client = client_for(settings)
        from_version = _alias_version(client, name, PRODUCTION)
        run_id = _write_audit(
            client,
            settings,
            alias=PRODUCTION,
            from_version=from_version,
            to_version=version,
            actor=actor,
            reason=reason,
            kind="gate",
            decision="rejected",
            seq=0,
            candidate=candidate,
            champion=champion,
            thresholds=thresholds,
            digest=digest,
        )
        client.set_model_version_tag(name, version, "validation_status", "rejected")
        client.set_model_version_tag(name, version, "rejection_reason", reason[:4000])
        client.set_model_version_tag(name, version, "validated_at", _now())
        client.set_terminated(run_id, "FINISHED")
        return Move(
            PRODUCTION,
            from_version,
            version,
            actor,
            reason,
            "gate",
            "rejected",
            _now(),
            run_id,
            0,
        )


def resolve(settings: Settings, *, version: str | None = None, alias: str | None = None) -> str:
    """The version number named directly or through an alias; one-line error if there is none."""
    with one_line_errors(settings):
        client = client_for(settings)
        _require_model(client, settings)
        if version is not None:
            _require_version(client, settings.model_name, version)
            return version
        found = _alias_version(client, settings.model_name, alias or STAGING)
        if found is None:
            raise RegistryError(
                f"no version of {settings.model_name} has alias @{alias or STAGING}; "
                "train one with `captchaops train` or pass --version N"
            )
        return found


def resolve_alias(settings: Settings, alias: str) -> str | None:
    """The version holding an alias, or None."""
    with one_line_errors(settings):
        return _alias_version(client_for(settings), settings.model_name, alias)


def _scores(
    settings: Settings, client: MlflowClient, to_version: str, from_version: str | None
) -> tuple[Score, Score | None]:
    evalset = ensure_evalset(settings)
    candidate = cached_score(client, settings, to_version, evalset)
    champion = cached_score(client, settings, from_version, evalset) if from_version else None
    return candidate, champion


def promote(
    settings: Settings,
    *,
    version: str | None = None,
    from_alias: str | None = None,
    reason: str,
    actor: str | None = None,
    force: bool = False,
) -> Move:
    """A person moves @production to a version (or to the @staging one), scored and audited."""
    actor = actor or default_actor()
    name = settings.model_name
    target = resolve(settings, version=version, alias=from_alias)
    with one_line_errors(settings):
        client = client_for(settings)
        tags = _require_version(client, name, target)
        current = _alias_version(client, name, PRODUCTION)
        if current == target:
            raise RegistryError(f"v{target} of {name} is already @production; nothing to do")
        if tags.get("validation_status") == "rejected" and not force:
            why = tags.get("rejection_reason", "no reason recorded")
            raise RegistryError(
                f"v{target} of {name} was rejected ({why[:200]}); pass --force to promote it anyway"
            )
        candidate, champion = _scores(settings, client, target, current)
        if not candidate.ok and not force:
            raise RegistryError(
                f"v{target} of {name} fails on the frozen set ({candidate.error}); "
                "fix the model or pass --force"
            )
    stamp = {"promoted_at": _now(), "promoted_by": actor, "promotion_reason": reason[:4000]}
    return move_alias(
        settings,
        alias=PRODUCTION,
        to_version=target,
        expect_from=current,
        reason=reason,
        actor=actor,
        kind="manual",
        candidate=candidate,
        champion=champion,
        thresholds={"forced": float(force)},
        version_tags={target: stamp},
    )


def rollback(
    settings: Settings, *, to: str | None = None, reason: str = "", actor: str | None = None
) -> Move:
    """Move @production back to the previous audited production version (or to `to`)."""
    actor = actor or default_actor()
    name = settings.model_name
    with one_line_errors(settings):
        client = client_for(settings)
        _require_model(client, settings)
        if to is not None:
            _require_version(client, name, to)
        current = _alias_version(client, name, PRODUCTION)
        stack = production_stack(_audit(client, name, PRODUCTION))
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
            target = earlier[-1]
        elif to == current:
            raise RegistryError(f"v{to} of {name} is already @production; nothing to do")
        elif to not in earlier:
            raise RegistryError(
                f"v{to} of {name} was never @production before v{current}; "
                f"use `captchaops promote --version {to}`"
            )
        else:
            target = to
        candidate, champion = _scores(settings, client, target, current)
    why = reason or f"rollback from v{current}"
    return move_alias(
        settings,
        alias=PRODUCTION,
        to_version=target,
        expect_from=current,
        reason=why,
        actor=actor,
        kind="rollback",
        candidate=candidate,
        champion=champion,
        version_tags={
            current: {
                "validation_status": "rejected",
                "rejection_reason": f"rolled back by {actor}: {why}"[:4000],
            },
            target: {"promoted_at": _now(), "promoted_by": actor, "promotion_reason": why[:4000]},
        },
    )


def _float(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _test_accuracy(client: MlflowClient, run_id: str | None) -> float | None:
    """The training run's test sequence accuracy, if the run still exists."""
    if not run_id:
        return None
    try:
        return client.get_run(run_id).data.metrics.get("test_seq_acc")
    except MlflowException:
        return None


def list_versions(settings: Settings, limit: int = 50) -> Listing:
    """Versions newest first with aliases, stage, validation status and key metrics."""
    name = settings.model_name
    with one_line_errors(settings):
        client = client_for(settings)
        _require_model(client, settings)
        model = client.get_registered_model(name)
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        versions = sorted(
            client.search_model_versions(f"name='{name}'"), key=lambda mv: -int(mv.version)
        )[:limit]
        rows = []
        for mv in versions:
            tags = mv.tags or {}
            test_acc = _test_accuracy(client, mv.run_id)
            rows.append(
                VersionRow(
                    version=str(mv.version),
                    aliases=sorted(aliases.get(str(mv.version), [])),
                    stage=mv.current_stage or "None",
                    status=tags.get("validation_status", "pending"),
                    created=datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).strftime(
                        "%Y-%m-%d %H:%M"
                    ),
                    test_seq_acc=test_acc,
                    eval_seq_acc=_float(tags.get("eval_seq_acc")),
                    eval_cer=_float(tags.get("eval_cer")),
                    note=tags.get("rejection_reason") or tags.get("promotion_reason", ""),
                )
            )
        last_moves = {
            key.removeprefix("last_move_"): value
            for key, value in model.tags.items()
            if key.startswith("last_move_")
        }
        return Listing(name, rows, last_moves)
