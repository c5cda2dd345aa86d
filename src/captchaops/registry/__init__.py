"""The registry: the only writer of aliases, version tags and audit runs.

Modules: `names` (aliases, scheme names, actors), `errors` (one-line errors), `audit` (the
audit trail), `lock` (the cross-process promotion lock), `aliases` (reading aliases, the one
audited move and the audited removal), `scores` (frozen-set scores kept in version tags),
`promotion` (promote, rollback, staging a trained version), `canary` (starting and ending a
canary), `listing` (the `models` table) and `versions` (creating registered models and their
versions). Library functions take an explicit `MlflowClient`
(from `registry.client(settings)`); the ones that take `Settings` make their own and turn
tracking failures into one-line `RegistryError`s.
"""

from captchaops.mlflow_scope import client
from captchaops.registry.aliases import (
    alias_version,
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
from captchaops.registry.canary import check_percent, end_canary, start_canary
from captchaops.registry.errors import RegistryError, one_line_errors
from captchaops.registry.listing import Listing, VersionRow, list_versions
from captchaops.registry.lock import LOCK_STALE_S, LOCK_TIMEOUT_S, promotion_lock
from captchaops.registry.names import (
    CANARY,
    PRODUCTION,
    STAGING,
    check_model_name,
    default_actor,
)
from captchaops.registry.promotion import promote, rollback, stage_candidate, to_production
from captchaops.registry.scores import cached_score, record_score
from captchaops.registry.versions import ensure_model, register_version

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
    "cached_score",
    "check_model_name",
    "check_percent",
    "client",
    "default_actor",
    "end_canary",
    "ensure_model",
    "history",
    "list_versions",
    "move_alias",
    "moves",
    "one_line_errors",
    "production_stack",
    "promote",
    "promotion_lock",
    "record_rejection",
    "record_score",
    "register_version",
    "remove_alias",
    "resolve",
    "resolve_alias",
    "rollback",
    "set_version_tags",
    "stage_candidate",
    "start_canary",
    "sync_stages",
    "to_production",
]
