"""The trial's verdicts, kept by ONNX digest in the server's home, so a network is tried in its
sandbox once: a restart, a second alias server of the same home, and a promotion of a version
already tried at @staging reuse the verdict instead of starting another child.

A verdict holds for exactly the bytes, images and limits it was made on: its key is the SHA-256
of the ONNX network (the digest a signed move names), and it also records the digest of
meta.json (geometry and preprocessing shape the trial's probes), the digest of the frozen-set
sample the trial ran (`captchaops.serving.frozen_sample`; "none" for a scheme without one), the
trial's limits (memory, CPU, largest batch) and the checks themselves (this captchaops's version and a digest of the modules that
judge: the graph policy, the version checks, the trial); any difference means a new trial. A
pass lets the server open the version itself (still with the version checks, the warm-up and
the finite-answer guard); a failure refuses the version at once. A trial stopped by its
wall-clock timeout is not a verdict (a busy machine, not the network) and is not kept.

Each verdict is one 0600 file `<digest>.json` in a 0700 folder under the home
(`<home>/serving-cache/verdicts/`), replaced atomically; at most `MAX_VERDICTS` are kept, the
oldest dropped first. A file that cannot be read or does not match is ignored (tried again).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from captchaops import __version__
from captchaops.serving.trial import TrialLimits

log = logging.getLogger(__name__)

MAX_VERDICTS = 256
"""Verdicts kept per home; a few hundred bytes each."""
_DIGEST = re.compile(r"[0-9a-f]{64}")
JUDGES = (
    "captchaops.model.graph_policy",
    "captchaops.model.version",
    "captchaops.serving.trial",
)
"""The modules whose checks a verdict stands for: a change to one makes every verdict stale."""


def verdicts_dir(home: Path) -> Path:
    """`<home>/serving-cache/verdicts`: shared by every model server of the home."""
    return home / "serving-cache" / "verdicts"


@dataclass(frozen=True)
class Verdict:
    """The outcome of one trial of one network under one set of limits."""

    onnx_sha256: str
    meta_sha256: str
    frozen: str
    """The key of the frozen-set sample the trial ran (`FrozenSample.key`)."""
    limits: str
    policy: str
    passed: bool
    reason: str = ""
    at: str = ""


@functools.cache
def policy() -> str:
    """This captchaops's version and a digest of the modules whose checks a verdict stands for."""
    digest = hashlib.sha256()
    for module in JUDGES:  # read, not imported: the server never imports onnx itself
        spec = importlib.util.find_spec(module)
        digest.update(Path(str(spec.origin if spec else module)).read_bytes())
    return f"{__version__}+{digest.hexdigest()[:16]}"


def limits_key(limits: TrialLimits) -> str:
    """The limits a verdict depends on, as one comparable string."""
    return f"mem={limits.memory_bytes},cpu={limits.cpu_seconds},batch={limits.max_batch}"


class Verdicts:
    """The verdict files of one home; every method is safe to call from several threads and
    processes (each write is one atomic replace of one file)."""

    def __init__(self, folder: Path, limit: int = MAX_VERDICTS) -> None:
        self.folder = folder
        self.limit = limit

    def find(
        self, onnx_sha256: str, meta_sha256: str, frozen: str, limits: TrialLimits
    ) -> Verdict | None:
        """The verdict made on these bytes with these frozen-set images under these limits, or
        None (not tried, or another meta.json, another sample, other limits, another
        captchaops, or an unreadable file)."""
        path = self._path(onnx_sha256)
        if path is None:
            return None
        try:
            raw = json.loads(path.read_text())
            verdict = Verdict(**{k: raw[k] for k in Verdict.__dataclass_fields__})
        except (OSError, ValueError, KeyError, TypeError):
            return None
        wanted = (onnx_sha256, meta_sha256, frozen, limits_key(limits), policy())
        found = (
            verdict.onnx_sha256,
            verdict.meta_sha256,
            verdict.frozen,
            verdict.limits,
            verdict.policy,
        )
        if found != wanted or not isinstance(verdict.passed, bool):
            return None
        return verdict

    def keep(
        self,
        onnx_sha256: str,
        meta_sha256: str,
        frozen: str,
        limits: TrialLimits,
        passed: bool,
        reason: str,
    ) -> Verdict:
        """Record a trial's outcome (best effort: a home that cannot be written only means
        the next load tries again)."""
        verdict = Verdict(
            onnx_sha256,
            meta_sha256,
            frozen,
            limits_key(limits),
            policy(),
            passed,
            reason,
            datetime.now(UTC).isoformat(timespec="seconds"),
        )
        path = self._path(onnx_sha256)
        if path is None:
            return verdict
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=".verdict-", dir=self.folder)  # 0600
            with os.fdopen(fd, "w") as out:
                json.dump(asdict(verdict), out)
            os.replace(tmp, path)
            self._bound()
        except OSError as exc:
            log.warning("cannot keep the trial's verdict in %s: %s", self.folder, exc)
        return verdict

    def _path(self, onnx_sha256: str) -> Path | None:
        return self.folder / f"{onnx_sha256}.json" if _DIGEST.fullmatch(onnx_sha256) else None

    def _bound(self) -> None:
        """Drop the oldest verdicts beyond `limit`."""
        with contextlib.suppress(OSError):
            files = [p for p in self.folder.glob("*.json") if _DIGEST.fullmatch(p.stem)]
            if len(files) <= self.limit:
                return
            files.sort(key=lambda p: p.stat().st_mtime)
            for old in files[: len(files) - self.limit]:
                old.unlink(missing_ok=True)
