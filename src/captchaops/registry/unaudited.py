"""Alias moves with no audit record, judged from a model's aliases and `last_move_<alias>` tags.

MLflow-free, so the model servers (which must not import MLflow) judge a move exactly as
`captchaops models` and `captchaops status` report it.
"""

from __future__ import annotations

import re

from captchaops.scheme_names import CANARY

MANAGED_ALIASES = ("production", "staging", CANARY)
LAST_MOVE = "last_move_"
"""Prefix of the registered-model tag the audited move writes last (`registry.aliases`)."""
_MOVED_TO = re.compile(r" -> v(\S+) \(")


def audited_version(last_move: str) -> str | None:
    """The version an alias's last audited move put there (None: a removal, or no move)."""
    found = _MOVED_TO.search(last_move)
    return found.group(1) if found else None


def unaudited_aliases(aliases: dict[str, str], last_moves: dict[str, str]) -> dict[str, str]:
    """Managed aliases (alias -> version) that their last audited move did not point there."""
    return {
        alias: str(version)
        for alias, version in aliases.items()
        if alias in MANAGED_ALIASES and audited_version(last_moves.get(alias, "")) != str(version)
    }


def last_moves(tags: dict[str, str]) -> dict[str, str]:
    """{alias: its last audited move's line} from a registered model's tags."""
    return {k.removeprefix(LAST_MOVE): v for k, v in tags.items() if k.startswith(LAST_MOVE)}
