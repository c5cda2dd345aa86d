"""Signed alias moves: the record the one registry writer signs and a model server checks.

An alias move is trusted only when an Ed25519 signature by the home's promotion key names exactly
that model, alias, version and ONNX digest. The key pair lives in the captchaops home (private
key 0600 in a 0700 folder, never in MLflow); servers hold only the public half. MLflow-free, so
the model servers, `captchaops models` and `captchaops status` verify with the same code.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import secrets
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNED_MOVE = "signed_move_"
"""Prefix of the registered-model tag holding an alias's last signed move (an envelope)."""
PRIVATE_KEY = "moves.key"
PUBLIC_KEY = "moves.pub"
ENVELOPE_VERSION = 1
MAX_ENVELOPE_CHARS = 4000


class Untrusted(Exception):
    """A signed move that must not be followed; the message is one line saying why."""


@dataclass(frozen=True)
class SignedMove:
    """What one signature vouches for: an alias of a model holds a version with this network."""

    model: str
    alias: str
    version: str
    """"" for a signed removal of the alias."""
    onnx_sha256: str
    evalset_sha256: str
    actor: str
    approver: str
    at: str
    seq: int
    nonce: str

    def canonical(self) -> bytes:
        """The exact bytes signed: sorted-key, compact, ASCII JSON of every field."""
        return json.dumps(
            asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        ).encode()


_TYPES = {f.name: (int if f.name == "seq" else str) for f in fields(SignedMove)}


def new_nonce() -> str:
    """A random nonce for a record (hex, 128 bits)."""
    return secrets.token_hex(16)


def key_paths(key_dir: Path) -> tuple[Path, Path]:
    """(private, public) key files in a key folder."""
    return key_dir / PRIVATE_KEY, key_dir / PUBLIC_KEY


def ensure_key(key_dir: Path) -> Ed25519PrivateKey:
    """The folder's private key, made once (safe when two processes race) with its public half."""
    private, public = key_paths(key_dir)
    key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(key_dir, 0o700)
    if not private.exists():
        made = Ed25519PrivateKey.generate()
        pem = made.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd, tmp = tempfile.mkstemp(prefix=".key-", dir=key_dir)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
            # os.link fails if another process made one first: keep theirs.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, private)
        finally:
            os.unlink(tmp)
    key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise Untrusted(f"{private} is not an Ed25519 private key; move it away to make a new one")
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if not public.exists() or public.read_bytes() != pub:
        fd, tmp = tempfile.mkstemp(prefix=".pub-", dir=key_dir)
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(pub)
        os.replace(tmp, public)
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key in a PEM file; Untrusted when it is missing or not one."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise Untrusted(f"no promotion public key at {path} ({type(exc).__name__})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise Untrusted(f"{path} is not an Ed25519 public key")
    return key


def seal(move: SignedMove, key: Ed25519PrivateKey) -> str:
    """The envelope stored in the registry: the record and its base64 signature, as JSON."""
    signature = base64.b64encode(key.sign(move.canonical())).decode()
    return json.dumps(
        {"v": ENVELOPE_VERSION, "move": asdict(move), "sig": signature},
        sort_keys=True,
        separators=(",", ":"),
    )


def open_seal(text: str, key: Ed25519PublicKey, *, model: str | None, alias: str) -> SignedMove:
    """The record of an envelope signed by `key` for `model@alias`; Untrusted otherwise
    (`model` None: for any model, when the caller holds only one model's tags).

    Fails closed: anything but exactly the known fields of the known types, strict base64 and a
    valid signature over the re-canonicalised record is refused.
    """
    if not text:
        raise Untrusted("no signed move")
    if len(text) > MAX_ENVELOPE_CHARS:
        raise Untrusted("the signed move is too long")
    try:
        raw: Any = json.loads(text)
    except ValueError as exc:
        raise Untrusted("the signed move is not JSON") from exc
    if not isinstance(raw, dict) or set(raw) != {"v", "move", "sig"}:
        raise Untrusted("the signed move's envelope has unknown or missing fields")
    if raw["v"] != ENVELOPE_VERSION or isinstance(raw["v"], bool):
        raise Untrusted("the signed move's envelope version is unknown")
    record, sig = raw["move"], raw["sig"]
    if not isinstance(record, dict) or set(record) != set(_TYPES):
        raise Untrusted("the signed move has unknown or missing fields")
    for name, kind in _TYPES.items():
        if type(record[name]) is not kind:
            raise Untrusted(f"the signed move's {name} is not a {kind.__name__}")
    if not isinstance(sig, str):
        raise Untrusted("the signature is not text")
    try:
        signature = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Untrusted("the signature is not base64") from exc
    move = SignedMove(**record)
    try:
        key.verify(signature, move.canonical())
    except InvalidSignature as exc:
        raise Untrusted("the signature does not verify with the promotion public key") from exc
    if (model is not None and move.model != model) or move.alias != alias:
        raise Untrusted(f"the signature is for {move.model}@{move.alias}, not {model}@{alias}")
    return move
