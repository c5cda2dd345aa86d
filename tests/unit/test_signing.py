"""Signed alias moves: the key pair is made once and kept private; verification fails closed."""

from __future__ import annotations

import base64
import json
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from captchaops.registry.signing import (
    SignedMove,
    Untrusted,
    ensure_key,
    key_paths,
    load_public_key,
    new_nonce,
    open_seal,
    seal,
)

MOVE = SignedMove(
    model="text-captcha",
    alias="production",
    version="3",
    onnx_sha256="a" * 64,
    evalset_sha256="b" * 64,
    actor="alice",
    approver="",
    at="2026-12-07T06:00:00+00:00",
    seq=4,
    nonce=new_nonce(),
)


def _public(key_dir: Path):  # type: ignore[no-untyped-def]
    ensure_key(key_dir)
    return load_public_key(key_paths(key_dir)[1])


def test_the_key_pair_is_made_once_private_and_readable_where_it_should_be(
    tmp_path: Path,
) -> None:
    key_dir = tmp_path / "keys"
    first = ensure_key(key_dir)
    private, public = key_paths(key_dir)
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    again = ensure_key(key_dir)
    assert again.public_key().public_bytes_raw() == first.public_key().public_bytes_raw()
    assert [p.name for p in sorted(key_dir.iterdir())] == ["moves.key", "moves.pub"]


def test_a_sealed_move_opens_with_its_public_key(tmp_path: Path) -> None:
    envelope = seal(MOVE, ensure_key(tmp_path))
    opened = open_seal(envelope, _public(tmp_path), model="text-captcha", alias="production")
    assert opened == MOVE


def _tampered(envelope: str, **changes: object) -> str:
    raw = json.loads(envelope)
    raw["move"].update(changes)
    return json.dumps(raw)


@pytest.mark.parametrize(
    "change",
    [{"version": "4"}, {"onnx_sha256": "c" * 64}, {"seq": 9}, {"actor": "mallory"}],
)
def test_any_changed_field_breaks_the_signature(tmp_path: Path, change: dict[str, object]) -> None:
    envelope = _tampered(seal(MOVE, ensure_key(tmp_path)), **change)
    with pytest.raises(Untrusted, match="does not verify"):
        open_seal(envelope, _public(tmp_path), model="text-captcha", alias="production")


def test_unknown_missing_or_mistyped_fields_are_refused(tmp_path: Path) -> None:
    envelope = seal(MOVE, ensure_key(tmp_path))
    key = _public(tmp_path)
    extra = _tampered(envelope, promoted_by="gate")
    missing = json.loads(envelope)
    del missing["move"]["approver"]
    as_text = _tampered(envelope, seq="4")
    as_bool = _tampered(envelope, seq=True)
    outer = json.loads(envelope) | {"note": "x"}
    for text in (extra, json.dumps(missing), as_text, as_bool, json.dumps(outer)):
        with pytest.raises(Untrusted):
            open_seal(text, key, model="text-captcha", alias="production")


def test_bad_base64_a_foreign_key_and_another_alias_are_refused(tmp_path: Path) -> None:
    envelope = seal(MOVE, ensure_key(tmp_path / "ours"))
    key = _public(tmp_path / "ours")
    raw = json.loads(envelope)
    for bad in ("not base64!", raw["sig"][:-4], base64.b64encode(b"x" * 64).decode()):
        with pytest.raises(Untrusted):
            open_seal(json.dumps(raw | {"sig": bad}), key, model="text-captcha", alias="production")
    with pytest.raises(Untrusted, match="does not verify"):
        open_seal(envelope, _public(tmp_path / "theirs"), model="text-captcha", alias="production")
    with pytest.raises(Untrusted, match="not text-captcha@staging"):
        open_seal(envelope, key, model="text-captcha", alias="staging")
    with pytest.raises(Untrusted, match="not other@production"):
        open_seal(envelope, key, model="other", alias="production")
    for text in ("", "{", "[]", "x" * 5000):
        with pytest.raises(Untrusted):
            open_seal(text, key, model="text-captcha", alias="production")


def test_a_missing_or_foreign_public_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Untrusted, match="no promotion public key"):
        load_public_key(tmp_path / "missing.pub")
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(Untrusted):
        load_public_key(tmp_path / "junk.pub")


def test_a_signed_removal_names_no_version(tmp_path: Path) -> None:
    removal = replace(MOVE, version="", onnx_sha256="")
    opened = open_seal(
        seal(removal, ensure_key(tmp_path)), _public(tmp_path), model=None, alias="production"
    )
    assert opened.version == ""


def test_the_gate_trusts_only_the_frozen_set_signed_when_it_was_made(tmp_path: Path) -> None:
    from captchaops.registry.versions import SIGNED_EVALSET, evalset_problem, sign_evalset

    public = key_paths(tmp_path)[1]
    made = sign_evalset("text-captcha", "d" * 64, "alice", tmp_path)
    tags = {"evalset_digest": "d" * 64, SIGNED_EVALSET: made}
    assert evalset_problem(tags, "text-captcha", public) is None
    replaced = tags | {"evalset_digest": "e" * 64}
    problem = evalset_problem(replaced, "text-captcha", public)
    assert problem is not None and problem.startswith(
        "the frozen set eeeeeeeeeeee of text-captcha is not the one signed when it was made "
        "(the signed set is dddddddddddd)"
    )
    assert "captchaops evalset --replace" in problem
    unsigned = {"evalset_digest": "d" * 64}
    assert "no signed move" in str(evalset_problem(unsigned, "text-captcha", public))
    other_model = evalset_problem(tags, "other-scheme", public)
    assert "not other-scheme@@evalset" in str(other_model)
    a_move = {"evalset_digest": "d" * 64, SIGNED_EVALSET: seal(MOVE, ensure_key(tmp_path))}
    assert "not text-captcha@@evalset" in str(evalset_problem(a_move, "text-captcha", public))
