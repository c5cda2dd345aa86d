"""The registry: the only writer of registry state (models, versions, aliases, tags, audit runs).

Modules: `names` (aliases, scheme names, actors), `errors` (one-line errors), `versions`
(registered models, version creation, the frozen set's pin), `rest_writes` (the same over REST,
for account admin), `audit` (the audit trail), `lock` (the cross-process promotion lock),
`aliases` (reading aliases, the one audited move and the audited removal), `signing` (the
signed record of a move), `unaudited` (the moves servers may trust) and `listing` (the
`models` table). Library functions take an explicit `MlflowClient` (from
`registry.client(settings)`); the ones that take `Settings` make their own and turn tracking
failures into one-line `RegistryError`s.

The bottom layer of the registry side (docs/layout.md): it stores what others decide and
imports neither `evaluation` nor `decisions`; promotion, rollback, canaries and the score
cache live in `captchaops.decisions`.

Names are imported on first use, so `captchaops.registry.rest_writes` (and the `users` command)
stays free of MLflow; `tests/unit/test_registry_writers.py` checks that the names below and
the modules that define them agree.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from captchaops.mlflow_scope import (
        client,
    )
    from captchaops.registry.aliases import (
        alias_version,
        assign_alias,
        move_alias,
        record_rejection,
        remove_alias,
        resolve,
        resolve_alias,
        set_version_tags,
        sync_stages,
    )
    from captchaops.registry.audit import (
        AUDIT_EXPERIMENT,
        MOVES,
        Move,
        history,
        moves,
        production_stack,
    )
    from captchaops.registry.errors import (
        RegistryError,
        one_line_errors,
    )
    from captchaops.registry.listing import (
        Listing,
        VersionRow,
        list_versions,
    )
    from captchaops.registry.lock import (
        LOCK_STALE_S,
        LOCK_TIMEOUT_S,
        promotion_lock,
    )
    from captchaops.registry.names import (
        CANARY,
        PRODUCTION,
        STAGING,
        check_model_name,
        default_actor,
    )
    from captchaops.registry.versions import (
        copy_version,
        ensure_model,
        pin_evalset,
        register_version,
    )

_HOMES = {
    **dict.fromkeys(
        ("client",),
        "captchaops.mlflow_scope",
    ),
    **dict.fromkeys(
        (
            "alias_version",
            "assign_alias",
            "move_alias",
            "record_rejection",
            "remove_alias",
            "resolve",
            "resolve_alias",
            "set_version_tags",
            "sync_stages",
        ),
        "captchaops.registry.aliases",
    ),
    **dict.fromkeys(
        (
            "AUDIT_EXPERIMENT",
            "MOVES",
            "Move",
            "history",
            "moves",
            "production_stack",
        ),
        "captchaops.registry.audit",
    ),
    **dict.fromkeys(
        (
            "RegistryError",
            "one_line_errors",
        ),
        "captchaops.registry.errors",
    ),
    **dict.fromkeys(
        (
            "Listing",
            "VersionRow",
            "list_versions",
        ),
        "captchaops.registry.listing",
    ),
    **dict.fromkeys(
        (
            "LOCK_STALE_S",
            "LOCK_TIMEOUT_S",
            "promotion_lock",
        ),
        "captchaops.registry.lock",
    ),
    **dict.fromkeys(
        (
            "CANARY",
            "PRODUCTION",
            "STAGING",
            "check_model_name",
            "default_actor",
        ),
        "captchaops.registry.names",
    ),
    **dict.fromkeys(
        (
            "copy_version",
            "ensure_model",
            "pin_evalset",
            "register_version",
        ),
        "captchaops.registry.versions",
    ),
}
__all__ = [
    "AUDIT_EXPERIMENT",
    "CANARY",
    "LOCK_STALE_S",
    "LOCK_TIMEOUT_S",
    "MOVES",
    "PRODUCTION",
    "STAGING",
    "Listing",
    "Move",
    "RegistryError",
    "VersionRow",
    "alias_version",
    "assign_alias",
    "check_model_name",
    "client",
    "copy_version",
    "default_actor",
    "ensure_model",
    "history",
    "list_versions",
    "move_alias",
    "moves",
    "one_line_errors",
    "pin_evalset",
    "production_stack",
    "promotion_lock",
    "record_rejection",
    "register_version",
    "remove_alias",
    "resolve",
    "resolve_alias",
    "set_version_tags",
    "sync_stages",
]


def __getattr__(name: str) -> Any:
    """Import an exported name from its module on first use."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
