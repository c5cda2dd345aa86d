"""An alias no valid signed move puts where it points is reported, whatever its tags claim."""

from __future__ import annotations

from pathlib import Path

from captchaops.registry.signing import (
    SIGNED_MOVE,
    SignedMove,
    ensure_key,
    key_paths,
    new_nonce,
    seal,
)
from captchaops.registry.unaudited import last_moves, unaudited_aliases

MOVE = "@production v2 -> v3 (promoted) by alice at 2026-12-03T10:00:00+00:00: better"


def _signed(key_dir: Path, alias: str, version: str) -> str:
    record = SignedMove(
        "text-captcha", alias, version, "a" * 64, "", "alice", "", "t", 1, new_nonce()
    )
    return seal(record, ensure_key(key_dir))


def test_an_alias_where_its_last_audited_move_put_it_is_audited() -> None:
    assert unaudited_aliases({"production": "3"}, {"production": MOVE}) == {}


def test_an_alias_moved_since_or_never_audited_is_reported() -> None:
    assert unaudited_aliases({"production": "4"}, {"production": MOVE}) == {"production": "4"}
    assert unaudited_aliases({"staging": "2"}, {}) == {"staging": "2"}
    removed = "@canary v5 -> nothing (ended) by bob at 2026-12-03T10:00:00+00:00: done"
    assert unaudited_aliases({"canary": "5"}, {"canary": removed}) == {"canary": "5"}


def test_aliases_captchaops_does_not_manage_are_left_alone() -> None:
    assert unaudited_aliases({"champion": "1"}, {}) == {}


def test_a_reason_quoting_an_arrow_does_not_count_as_the_move() -> None:
    tricky = "@production v2 -> v3 (promoted) by a at t: was -> v9 (x) before"
    assert unaudited_aliases({"production": "9"}, {"production": tricky}) == {"production": "9"}


def test_a_forged_last_move_tag_without_a_signature_is_reported(tmp_path: Path) -> None:
    public = key_paths(tmp_path)[1]
    ensure_key(tmp_path)
    forged = {"last_move_production": "@production v2 -> v7 (promoted) by admin at t: ok"}
    lines = last_moves(forged, public)
    assert unaudited_aliases({"production": "7"}, lines) == {"production": "7"}
    assert "no valid signed move: no signed move" in lines["production"]
    assert lines["production"].startswith("@production v2 -> v7 (promoted) by admin")


def test_a_signed_move_vouches_for_its_version_only(tmp_path: Path) -> None:
    public = key_paths(tmp_path)[1]
    tags = {
        "last_move_production": MOVE,
        SIGNED_MOVE + "production": _signed(tmp_path, "production", "3"),
    }
    lines = last_moves(tags, public)
    assert lines["production"] == MOVE
    assert unaudited_aliases({"production": "3"}, lines) == {}
    assert unaudited_aliases({"production": "4"}, lines) == {"production": "4"}


def test_a_signature_by_another_key_or_for_another_alias_is_not_trusted(tmp_path: Path) -> None:
    public = key_paths(tmp_path / "ours")[1]
    ensure_key(tmp_path / "ours")
    theirs = {
        "last_move_production": MOVE,
        SIGNED_MOVE + "production": _signed(tmp_path / "theirs", "production", "3"),
    }
    assert unaudited_aliases({"production": "3"}, last_moves(theirs, public)) == {"production": "3"}
    moved = {
        "last_move_production": MOVE,
        SIGNED_MOVE + "production": _signed(tmp_path / "ours", "staging", "3"),
    }
    assert unaudited_aliases({"production": "3"}, last_moves(moved, public)) == {"production": "3"}
