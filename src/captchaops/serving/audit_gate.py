"""Whether a model server follows an alias: only where a move signed by the promotion key says so.

A server holds the promotion public key (`Settings.effective_signing_public_key`). It follows
`@alias -> vN` only while the model's `signed_move_<alias>` tag verifies and names exactly that
alias and version (and, when loaded, the network's ONNX digest: `refusal`), with a sequence
number no lower than the last it trusted. Anything else (a raw REST move, a forged
`last_move_` tag or audit run, a tampered or replayed signature) leaves it serving the last
signed version, in local and team mode alike, and says so in `/health`, its log and
`captchaops_unaudited_alias`. The last trusted record is kept beside the server's
last-known-good copy, so a restart neither forgets it nor accepts an older one.
The writer signs just before it moves the alias, so a signed move is followed on the alias's
webhook; a move seen without a signature is checked again every second for a while before the
server settles on the slower timer.
Run ids are remembered per version of one registered model: a model deleted and made again
(its creation time changes, even within one poll interval) numbers its versions afresh, so what
was remembered about the old one is dropped at the first read that sees the new one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import Gauge

from captchaops.registry.signing import SIGNED_MOVE, SignedMove, Untrusted
from captchaops.registry.unaudited import signed_move
from captchaops.tracking_rest import API, TrackingRest, VersionRef

log = logging.getLogger(__name__)

RECHECK_S = 1.0
PENDING_S = 20.0
"""For this long after an unsigned move is first seen, the alias is checked every RECHECK_S."""
TRUSTED_FILE = "signed-move.json"
MAX_REFS = 16
"""Versions whose run ids are remembered (`AuditGate.ref`)."""


def registered_model(rest: TrackingRest, name: str) -> tuple[dict[str, str], dict[str, str], str]:
    """A registered model's aliases ({alias: version}), tags and creation time (one read); all
    empty when it is missing. The creation time tells a model made again from the one before."""
    found = rest.call("GET", f"{API}/registered-models/get", missing_ok=True, params={"name": name})
    model = found.get("registered_model") or {}
    aliases = {
        str(a.get("alias")): str(a.get("version"))
        for a in model.get("aliases") or []
        if isinstance(a, dict)
    }
    tags = {
        str(t.get("key")): str(t.get("value", ""))
        for t in model.get("tags") or []
        if isinstance(t, dict)
    }
    return aliases, tags, str(model.get("creation_timestamp") or "")


class AuditGate:
    """Judges each answer about an alias against the last move the promotion key signed."""

    def __init__(
        self,
        rest: TrackingRest,
        name: str,
        alias: str,
        *,
        key_path: Path,
        gauge: Gauge,
        state_dir: Path | None = None,
    ) -> None:
        self.rest = rest
        self.name = name
        self.alias = alias
        self.key_path = key_path
        self.gauge = gauge
        self.state_dir = state_dir
        self.unaudited: str | None = None
        """What the alias holds without a valid signature ("" when it was deleted), else None."""
        self.why: str = ""
        self.trusted: SignedMove | None = None
        self._envelope = ""
        self._since = 0.0
        self._refs: dict[str, VersionRef] = {}
        self._refs_lock = threading.Lock()
        self._created = ""
        """The creation time of the registered model `_refs` describes ("" before a read)."""
        self._aliases: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._restore()

    @property
    def audited(self) -> str | None:
        """The version the last trusted signed move put on the alias (None: none, or removed)."""
        return (self.trusted.version or None) if self.trusted is not None else None

    def judge(self) -> VersionRef | None:
        """The answer to act on, from one read of the registered model (its aliases and signed
        moves): the alias's version when a valid signed move names it, else the last signed
        version (None: nothing signed to serve)."""
        aliases, tags, created = registered_model(self.rest, self.name)
        self._aliases, self._tags = aliases, tags
        seen = aliases.get(self.alias, "")
        with self._refs_lock:
            if created != self._created:  # deleted (and maybe made again): versions renumbered
                self._refs.clear()
                self._created = created
        why = self._consider(tags, seen)
        if self.trusted is not None and self.trusted.version == seen:
            if self.unaudited is not None:
                log.info("@%s v%s is signed now", self.alias, seen or "(removed)")
            self.unaudited, self.why = None, ""
            self.gauge.set(0)
            return self.ref(seen) if seen else None
        if seen == "" and self.trusted is None:
            self.unaudited, self.why = None, ""  # nothing there, nothing signed: nothing to say
            self.gauge.set(0)
            return None
        if self.unaudited != seen or self.why != why:
            self._since = time.monotonic()
            self.unaudited, self.why = seen, why
            log.warning("%s", self.reason())
        self.gauge.set(1)
        held = self.audited
        return self.ref(held) if held is not None else None

    def ref(self, version: str) -> VersionRef:
        """Version `version` of the model with its run id, asked of the registry once per
        version (a version's run never changes): the pre-load asks, so a promotion to the
        pre-loaded version costs no round trip besides `judge`'s one read."""
        with self._refs_lock:
            found, created = self._refs.get(version), self._created
        if found is None:
            found = self.rest.version_ref(self.name, version)
            with self._refs_lock:
                if created != self._created:  # the model was made again during the lookup
                    return found
                while len(self._refs) >= MAX_REFS:
                    self._refs.pop(next(iter(self._refs)))
                self._refs[version] = found
        return found

    def signed_at(self, alias: str) -> SignedMove | None:
        """The signed move that put on `alias` (another alias of the model, e.g. staging) the
        version it held at the last `judge`; None when it holds none or no valid signature
        vouches for it."""
        version = self._aliases.get(alias)
        if not version:
            return None
        try:
            move = signed_move(self._tags, alias, self.key_path, model=self.name)
        except Untrusted:
            return None
        return move if move.version == version else None

    def refusal(self, version: str, onnx_sha256: str) -> str | None:
        """Why a loaded version must not be served (its network is not the one signed), or None."""
        trusted = self.trusted
        if trusted is None or trusted.version != version:
            return f"no signed move puts version {version} on @{self.alias}"
        if trusted.onnx_sha256 != onnx_sha256:
            return (
                f"version {version}'s ONNX network ({onnx_sha256[:12]}) is not the one the signed "
                f"move names ({trusted.onnx_sha256[:12]})"
            )
        return None

    def pending(self) -> bool:
        """Whether an unsigned move is recent enough to check again soon."""
        recent = time.monotonic() - self._since < PENDING_S
        return self.unaudited is not None and recent

    def reason(self) -> str | None:
        """Why the server serves what it serves, while the alias holds an unsigned move."""
        if self.unaudited is None:
            return None
        moved = f"moved to v{self.unaudited}" if self.unaudited else "deleted"
        then = f"v{self.audited}" if self.audited else "nothing"
        return (
            f"@{self.alias} was {moved} with no audit record (no valid signed move: {self.why}): "
            f"keeping {then} until the move is made with the CLI or reverted"
        )

    def describe(self) -> dict[str, Any]:
        """The `/health` fields: the unsigned version (if any), the last signed one and why."""
        return {
            "unaudited_version": self.unaudited,
            "follows_unaudited": False,
            "signed_version": self.audited,
            "unaudited_reason": self.why or None,
        }

    def _consider(self, tags: dict[str, str], seen: str) -> str:
        """Trust the tag's signed move once the alias holds what it names (the writer signs just
        before it moves the alias) and it is no older than the trusted one; returns why the
        alias's state is not vouched for by the tag ("" when it is)."""
        try:
            move = signed_move(tags, self.alias, self.key_path, model=self.name)
        except Untrusted as exc:
            return str(exc)
        if self.trusted is not None and move.seq < self.trusted.seq:
            return f"a replayed signed move (seq {move.seq}, already trusted {self.trusted.seq})"
        if move.version != seen:
            target = f"v{move.version}" if move.version else "a removal"
            return f"the signed move names {target}"
        if move != self.trusted:
            self.trusted = move
            self._save(tags)
        return ""

    def _state(self) -> Path | None:
        return self.state_dir / TRUSTED_FILE if self.state_dir is not None else None

    def _restore(self) -> None:
        """The last trusted signed move from the state file, verified again (else nothing)."""
        path = self._state()
        if path is None:
            return
        with contextlib.suppress(OSError, Untrusted):
            text = path.read_text()
            self.trusted = signed_move(
                {SIGNED_MOVE + self.alias: text}, self.alias, self.key_path, model=self.name
            )
            self._envelope = text

    def _save(self, tags: dict[str, str]) -> None:
        """Keep the trusted envelope beside the last-known-good copy (best effort)."""
        path = self._state()
        text = tags.get(SIGNED_MOVE + self.alias, "")
        if path is None or text == self._envelope:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=".signed-", dir=path.parent)
            with os.fdopen(fd, "w") as out:
                out.write(text)
            os.replace(tmp, path)
            self._envelope = text
        except OSError as exc:
            log.warning("cannot keep the trusted signed move in %s: %s", path, exc)
