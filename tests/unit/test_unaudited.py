"""An alias move made around captchaops (no audit record put the alias there) is found."""

from __future__ import annotations

from captchaops.registry.unaudited import unaudited_aliases

MOVE = "@production v2 -> v3 (promoted) by alice at 2026-12-03T10:00:00+00:00: better"


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
