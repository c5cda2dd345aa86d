"""Alias moves no valid signature vouches for, judged from a model's aliases and tags.

An alias is audited only while its `signed_move_<alias>` tag carries a move signed by the
promotion key (`registry.signing`) naming the version it holds; the `last_move_<alias>` line is
what people read, never what is trusted. MLflow-free, so the model servers (which must not import
MLflow) judge a move exactly as `captchaops models` and `captchaops status` report it.
"""

from __future__ import annotations

import re
from pathlib import Path

from captchaops.registry.signing import (
    SIGNED_MOVE,
    SignedMove,
    Untrusted,
    load_public_key,
    open_seal,
)
from captchaops.scheme_names import CANARY
from captchaops.settings import load_settings

MANAGED_ALIASES = ("production", "staging", CANARY)
LAST_MOVE = "last_move_"
"""Prefix of the registered-model tag the audited move writes last (`registry.aliases`)."""
_MOVED_TO = re.compile(r" -> v(\S+) \(")


_UNSIGNED = " [no valid signed move: "
"""Marks a line `last_moves` found no valid signature for; such a line names no version."""


def audited_version(last_move: str) -> str | None:
    """The version an alias's last audited move put there (None: a removal, no move, or a line
    no valid signature vouches for)."""
    if _UNSIGNED in last_move:
        return None
    found = _MOVED_TO.search(last_move)
    return found.group(1) if found else None


def unaudited_aliases(aliases: dict[str, str], last_moves: dict[str, str]) -> dict[str, str]:
    """Managed aliases (alias -> version) that their last audited move did not point there."""
    return {
        alias: str(version)
        for alias, version in aliases.items()
        if alias in MANAGED_ALIASES and audited_version(last_moves.get(alias, "")) != str(version)
    }


def signed_move(
    tags: dict[str, str], alias: str, key_path: Path, model: str | None = None
) -> SignedMove:
    """The alias's last signed move in a model's tags, verified; Untrusted when there is none.

    `model` None skips the model-name check (a caller that holds only the tags).
    """
    key = load_public_key(key_path)
    return open_seal(tags.get(SIGNED_MOVE + alias, ""), key, model=model, alias=alias)


def last_moves(tags: dict[str, str], key_path: Path | None = None) -> dict[str, str]:
    """{alias: its last audited move's line} from a registered model's tags, as far as a valid
    signature vouches for it: the line of a managed alias whose signed move does not verify is
    marked as naming no version, so `unaudited_aliases` reports it wherever it points.

    `key_path` None: the public key of the settings in force.
    """
    if key_path is None:
        key_path = load_settings().effective_signing_public_key
    lines = {k.removeprefix(LAST_MOVE): v for k, v in tags.items() if k.startswith(LAST_MOVE)}
    signed = {k.removeprefix(SIGNED_MOVE) for k in tags if k.startswith(SIGNED_MOVE)}
    for alias in set(MANAGED_ALIASES) & (set(lines) | signed):
        try:
            move = signed_move(tags, alias, key_path)
        except Untrusted as exc:
            lines[alias] = lines.get(alias, f"@{alias}") + f"{_UNSIGNED}{exc}]"
            continue
        if audited_version(lines.get(alias, "")) != (move.version or None):
            target = f"v{move.version}" if move.version else "nothing"
            lines[alias] = f"@{alias} -> {target} (signed) by {move.actor} at {move.at}"
    return lines
