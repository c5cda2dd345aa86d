"""Loading a registered version into a model server: download, check and open, warm up, each
within its own timeout; the last version that passed all three is kept on disk for restarts
while the registry cannot be reached.

The trial (`captchaops.serving.trial`) runs once per network: its verdict is kept by ONNX
digest in the home (`captchaops.serving.verdicts`), so the same bytes under the same limits are
opened at once (a pass) or refused at once (a failure), and `trials` counts which happened.
The trial and the server's own warm-up run the largest batch the server sends, of white, black,
noise and frozen-set images (`captchaops.serving.frozen_sample`: a sample of the scheme's frozen
evaluation set, read once per set; a verdict holds only for the sample it ran), with the same
CPU budget (`Settings.version_cpu_seconds`); a served version's
answers are checked once more as they leave it, so a confidence that is not a finite number
fails the request with a JSON error instead of reaching a client as `NaN`.

Only the ONNX network and meta.json are read, after the checks in `captchaops.model.version`;
nothing a version carries is unpickled or imported, and MLflow itself is imported only for
artifact stores the tracking server does not proxy.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from hashlib import sha256
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import yaml

from captchaops.model.version import (
    MAX_META_BYTES,
    META_ARTIFACT,
    ONNX_ARTIFACT,
    VersionError,
    check_model_dir,
    open_version,
)
from captchaops.serving.frozen_sample import FrozenSample, FrozenSamples
from captchaops.serving.trial import ImageModel as ImageModel
from captchaops.serving.trial import (
    NonFiniteOutput,
    TrialFailed,
    TrialLimits,
    run_trial,
    warm_up,
)
from captchaops.serving.verdicts import Verdicts
from captchaops.tracking_rest import (
    ArtifactTooLarge,
    TrackingError,
    TrackingRest,
    TrackingUnreachable,
    VersionRef,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
GOOD_FILE = "good.json"
_SAFE_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class LoadError(Exception):
    """A version could not be loaded in time; the message is one line saying why."""


@dataclass(frozen=True)
class Timeouts:
    """How long each step of a load may take before the server gives up on it (seconds)."""

    download: float = 120.0
    load: float = 60.0
    warm_up: float = 30.0
    """Also the trial's CPU budget when the loader is given no TrialLimits."""


@dataclass(frozen=True)
class Loaded:
    """A checked, opened and warmed-up version."""

    ref: VersionRef
    model: ImageModel
    seconds: float
    last_known_good: bool = False
    files: tuple[Path, Path] | None = None
    """(folder, model folder inside it) of a load not yet kept as last-known-good (`keep=False`)."""


def cache_dir_for(home: Path, name: str, alias: str) -> Path:
    """`<home>/serving-cache/<model>/<alias>`: where a server keeps its last-known-good copy."""
    return home / "serving-cache" / _path_part(name) / _path_part(alias)


SLOTS = "replicas"
"""The folder under an alias's cache holding the copies of its other servers in the same home."""
MAX_SLOTS = 64
_CLAIMS: list[int] = []  # descriptors whose locks this process holds until it exits


def claim_cache_dir(cache: Path) -> Path:
    """The cache folder this process alone uses: `cache` when no other live server of the home
    holds it, else the first free `cache/replicas/<n>`.

    A server deletes from its cache folder every download it did not keep, so two servers of one
    alias sharing a folder deleted each other's downloads (and one cached a verdict on a half-
    deleted copy). The claim is an exclusive `flock` held for the process's life: the kernel drops
    it when the process dies, so a restarted server takes a folder back (and, its alias being the
    same, any slot's last-known-good copy is one it may serve). A home where the lock file cannot
    be made gets `cache` unchanged: the loader already serves without a copy there."""
    for folder in [cache, *(cache / SLOTS / str(n) for n in range(1, MAX_SLOTS + 1))]:
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(folder / ".owner", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.warning("cannot claim a cache folder in %s: %s", folder, exc)
            return cache
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _CLAIMS.append(fd)
        return folder
    log.warning(
        "more than %d servers of one alias share %s: no last-known-good copy", MAX_SLOTS, cache
    )
    return Path(tempfile.mkdtemp(prefix="captchaops-cache-"))


@dataclass(frozen=True)
class ServedModel:
    """A loaded, warmed-up registered model version."""

    name: str
    alias: str
    version: str
    run_id: str
    loaded_at: str
    load_seconds: float
    model: ImageModel = field(repr=False)
    last_known_good: bool = False
    preload_seconds: float | None = None
    """How long its pre-load took in the background (None: not pre-loaded); `load_seconds` is
    then the swap's own time."""

    def describe(self) -> dict[str, Any]:
        """What `/version` answers."""
        return {
            "name": self.name,
            "alias": self.alias,
            "version": self.version,
            "run_id": self.run_id,
            "loaded_at": self.loaded_at,
            "load_seconds": round(self.load_seconds, 3),
            "preload_seconds": (
                round(self.preload_seconds, 3) if self.preload_seconds is not None else None
            ),
            "alphabet": self.model.meta.get("alphabet"),
            "height": self.model.meta.get("height"),
            "width": self.model.meta.get("width"),
        }


class VersionLoader:
    """Loads versions of one alias and keeps the last good one under `cache_dir`."""

    def __init__(
        self,
        rest: TrackingRest,
        cache_dir: Path,
        timeouts: Timeouts,
        trial: TrialLimits | None = None,
        verdicts: Verdicts | None = None,
        samples: FrozenSamples | None = None,
    ) -> None:
        self.rest = rest
        self.cache_dir = cache_dir
        self.timeouts = timeouts
        self.trial = trial or TrialLimits(
            cpu_seconds=max(1, math.ceil(timeouts.warm_up)),
            wall_seconds=timeouts.load + timeouts.warm_up,
        )
        self.verdicts = verdicts
        self.samples = samples
        """Where the trial and warm-up find a scheme's frozen-set images (None: none are run)."""
        self.trials = {"run": 0, "passed_cached": 0, "refused_cached": 0}
        """Trials run in a child, and loads a kept verdict decided without one."""
        self._overdue: threading.Thread | None = None

    def load(self, ref: VersionRef, keep: bool = True) -> Loaded:
        """The version `ref` names, from the last-known-good copy when it is that version, else
        downloaded; every check runs either way. With `keep` False (a pre-load) the download
        stays in this loader's folder, the only one there, until `adopt` or the next load.
        Raises LoadError, VersionError, TrackingError."""
        started = time.monotonic()
        good = self._good() if keep else None
        if good is not None and good[0].version == ref.version:
            with contextlib.suppress(Exception):
                return Loaded(ref, self.open_folder(good[1], ref.name), time.monotonic() - started)
        if not keep:
            self._sweep(keep=None)
        folder, kept = self._new_folder()
        try:
            # The step is abandoned after `download` s; the download's own deadline, a second
            # later, then closes its connection, so no thread is left waiting on the server.
            deadline = time.monotonic() + self.timeouts.download + 1.0
            local = self._within(
                self.timeouts.download,
                f"downloading version {ref.version}",
                lambda: self._download(ref, folder, deadline),
            )
            if not local.resolve().is_relative_to(folder.resolve()):
                raise LoadError(f"version {ref.version} was downloaded outside its folder")
            model = self.open_folder(local, ref.name)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if not keep:
            files = (folder, local) if kept else None
            if not kept:
                shutil.rmtree(folder, ignore_errors=True)
            return Loaded(ref, model, time.monotonic() - started, files=files)
        if kept:
            try:
                self._keep(ref, folder, local)
            except OSError as exc:
                log.warning("cannot keep version %s as last-known-good: %s", ref.version, exc)
                kept = False
        if not kept:
            shutil.rmtree(folder, ignore_errors=True)
        return Loaded(ref, model, time.monotonic() - started)

    def adopt(self, loaded: Loaded) -> None:
        """Make a version another loader pre-loaded (`keep=False`) this one's last-known-good
        copy: its folder moves here (best effort; the served model is already open)."""
        if loaded.files is None:
            return
        folder, local = loaded.files
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            target = Path(tempfile.mkdtemp(prefix="version-", dir=self.cache_dir))
            target.rmdir()
            os.rename(folder, target)
            self._keep(loaded.ref, target, target / local.relative_to(folder))
        except (OSError, ValueError) as exc:
            log.warning("cannot keep version %s as last-known-good: %s", loaded.ref.version, exc)

    def discard(self) -> None:
        """Delete what a pre-load left in this loader's folder."""
        self._sweep(keep=None)

    def load_last_good(self) -> Loaded | None:
        """The last-known-good copy, checked and warmed up again; None when there is none."""
        good = self._good()
        if good is None:
            return None
        started = time.monotonic()
        model = self.open_folder(good[1], good[0].name)
        return Loaded(good[0], model, time.monotonic() - started, True)

    def forget(self) -> None:
        """Delete the last-known-good copy (its alias no longer exists)."""
        with contextlib.suppress(OSError):
            (self.cache_dir / GOOD_FILE).unlink()
        self._sweep(keep=None)

    def _new_folder(self) -> tuple[Path, bool]:
        """A fresh folder for a download, and whether it is inside the cache: a home that is
        read-only or full still serves, only without a last-known-good copy."""
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            return Path(tempfile.mkdtemp(prefix="version-", dir=self.cache_dir)), True
        except OSError as exc:
            log.warning("cannot keep a last-known-good copy in %s: %s", self.cache_dir, exc)
            return Path(tempfile.mkdtemp(prefix="captchaops-version-")), False

    def _download(self, ref: VersionRef, folder: Path, deadline: float) -> Path:
        """The files of `ref` the server reads (MLmodel, then the ONNX network and meta.json it
        names: three requests), or the whole tree where that is not possible."""
        uri = self.rest.download_uri(ref.name, ref.version)
        try:
            self.rest.download_files(uri, folder, ["MLmodel"], deadline=deadline)
            needed = _served_files(folder / "MLmodel")
            if needed:
                self.rest.download_files(uri, folder, needed, deadline=deadline)
                return folder
        except (TrackingUnreachable, ArtifactTooLarge):
            raise
        except TrackingError:
            pass  # not proxied, or no such file: the whole tree, and the checks say what is wrong
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(mode=0o700)
        return self.rest.download_artifacts(uri, folder, deadline=deadline)

    def open_folder(self, folder: Path, name: str | None = None) -> ImageModel:
        """A downloaded version in `folder` of registered model `name`, tried in its sandbox (or
        decided by a kept verdict), opened and warmed up, both with the frozen-set sample of
        `name`; raises LoadError or VersionError."""
        sample = self._sample(name)
        tried = self._try(folder, sample)
        model: ImageModel = self._within(
            self.timeouts.load,
            "checking and opening the version",
            lambda: open_version(folder, check_ops=False),
        )
        if tried is not None and model.meta.get("onnx_sha256") != tried:
            raise LoadError("the version's ONNX network changed after its trial; it is refused")
        batch = self.trial.max_batch
        self._within(  # the trial's budget: one value for both
            float(self.trial.cpu_seconds),
            "the warm-up prediction",
            lambda: warm_up(model, batch, sample.images),
        )
        return FiniteAnswers.wrap(model)

    def _sample(self, name: str | None) -> FrozenSample:
        """The frozen-set images of registered model `name` (none without a name or samples)."""
        if self.samples is None or name is None:
            return FrozenSample(note="no frozen evaluation set is read by this loader")
        return self.samples.for_model(name)

    def _try(self, folder: Path, sample: FrozenSample) -> str | None:
        """The graph policy, opening and warm-up in a limited child, unless a verdict on these
        bytes with these frozen-set images under these limits is kept; returns the ONNX digest
        the verdict holds for (None: none could be read before the trial, which then explains).
        Raises LoadError."""
        digests = _digests(folder) if self.verdicts is not None else None
        key = (*digests, sample.key) if digests is not None else None
        if key is not None and self.verdicts is not None:
            verdict = self.verdicts.find(*key, self.trial)
            if verdict is not None and verdict.passed:
                self.trials["passed_cached"] += 1
                return key[0]
            if verdict is not None:
                self.trials["refused_cached"] += 1
                raise LoadError(f"{verdict.reason} (its trial's verdict, kept since {verdict.at})")
        self.trials["run"] += 1
        try:
            run_trial(folder, self.trial, sample.images)
        except TrialFailed as exc:
            if key is not None and self.verdicts is not None and exc.lasting:
                self.verdicts.keep(*key, self.trial, passed=False, reason=str(exc))
            raise LoadError(str(exc)) from exc
        if key is not None and self.verdicts is not None:
            reason = "" if sample.images else f"tried without frozen-set images: {sample.note}"
            self.verdicts.keep(*key, self.trial, passed=True, reason=reason)
        return key[0] if key is not None else None

    def _within(self, seconds: float, what: str, step: Callable[[], T]) -> T:
        """Run `step` in a thread and wait at most `seconds` for it. A step that overruns is
        abandoned (Python cannot stop a thread), and no new step starts while it still runs."""
        if self._overdue is not None:
            self._overdue.join(1.0)
            if self._overdue.is_alive():
                raise LoadError(f"{self._overdue.name} is still running past its timeout")
            self._overdue = None
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["value"] = step()
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=run, name=what, daemon=True)
        thread.start()
        thread.join(seconds)
        if thread.is_alive():
            self._overdue = thread
            raise LoadError(f"{what} took longer than {seconds:g} s")
        if "error" in outcome:
            raise outcome["error"]
        value: T = outcome["value"]
        return value

    def _good(self) -> tuple[VersionRef, Path] | None:
        try:
            raw = json.loads((self.cache_dir / GOOD_FILE).read_text())
            folder = self.cache_dir / str(raw["folder"])
            model = (folder / str(raw["model"])).resolve()
            ref = VersionRef(str(raw["name"]), str(raw["version"]), str(raw["run_id"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if folder.parent != self.cache_dir or not model.is_relative_to(folder.resolve()):
            return None
        return (ref, model) if model.is_dir() else None

    def _keep(self, ref: VersionRef, folder: Path, model: Path) -> None:
        """Make `model` (inside `folder`) the last-known-good copy; the pointer file is replaced
        atomically, so a crash leaves either the old copy or the new one."""
        record = {
            "name": ref.name,
            "version": ref.version,
            "run_id": ref.run_id,
            "folder": folder.name,
            "model": str(model.resolve().relative_to(folder.resolve())),
            "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        fd, tmp = tempfile.mkstemp(prefix=".good-", dir=self.cache_dir)
        with os.fdopen(fd, "w") as out:
            json.dump(record, out)
        os.replace(tmp, self.cache_dir / GOOD_FILE)
        self._sweep(keep=folder.name)

    def _sweep(self, keep: str | None) -> None:
        """Delete this loader's downloads but `keep` (other servers' slots stay)."""
        with contextlib.suppress(OSError):
            for entry in self.cache_dir.iterdir():
                if entry.is_dir() and entry.name not in (keep, SLOTS):
                    shutil.rmtree(entry, ignore_errors=True)


class FiniteAnswers:
    """A loaded version whose answers are checked as they leave it: a confidence that is not a
    finite number raises NonFiniteOutput (the request fails with a JSON error), never `NaN`."""

    def __init__(self, model: ImageModel) -> None:
        self.model = model
        self.meta = model.meta

    @staticmethod
    def wrap(model: ImageModel) -> FiniteAnswers:
        """`model` checked; it reads decoded pixels (`predict_pixels`) only if `model` does."""
        return (
            FinitePixelAnswers(model) if hasattr(model, "predict_pixels") else FiniteAnswers(model)
        )

    def predict_images(self, images: list[bytes]) -> list[dict[str, Any]]:
        """Text and confidence for each image, each confidence a finite number."""
        return _finite(self.model.predict_images(images))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


class FinitePixelAnswers(FiniteAnswers):
    """`FiniteAnswers` of a version that also reads images already decoded."""

    def predict_pixels(self, pixels: Any) -> list[dict[str, Any]]:
        """As `predict_images`, for uint8[N, H, W, C] pixels (the reader's `predict_pixels`)."""
        return _finite(self.model.predict_pixels(pixels))  # type: ignore[attr-defined]


def _finite(answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for answer in answers:
        confidence = answer.get("confidence")
        if not isinstance(confidence, int | float) or not math.isfinite(confidence):
            raise NonFiniteOutput(
                "the served version answered a confidence that is not a finite number; "
                "it is refused (stage a version that passes its trial)"
            )
    return answers


def _digests(folder: Path) -> tuple[str, str] | None:
    """(ONNX digest, digest of the parsed meta.json) of a downloaded version, the ONNX one read
    from the bytes (`check_model_dir` compares them); None when its files do not pass the
    checks, which the trial then reports."""
    try:
        meta, _ = check_model_dir(folder)
    except (VersionError, OSError):
        return None
    return meta.onnx_sha256, sha256(meta.model_dump_json().encode()).hexdigest()


def _served_files(mlmodel: Path) -> list[str]:
    """The ONNX network's and meta.json's paths as MLmodel names them ([] when it names no safe
    pair: the caller then downloads everything and the version checks explain)."""
    try:
        if mlmodel.stat().st_size > MAX_META_BYTES:
            return []
        spec = yaml.safe_load(mlmodel.read_text())
        artifacts = spec["flavors"]["python_function"]["artifacts"]
        paths = [str(artifacts[name]["path"]) for name in (ONNX_ARTIFACT, META_ARTIFACT)]
    except (OSError, yaml.YAMLError, UnicodeDecodeError, KeyError, TypeError):
        return []
    safe = all(p and not p.startswith("/") and ".." not in PurePosixPath(p).parts for p in paths)
    return paths if safe else []


def _path_part(text: str) -> str:
    """`text` as one safe path component (a digest when it is not one already)."""
    if _SAFE_PART.fullmatch(text):
        return text
    return "x-" + sha256(text.encode()).hexdigest()[:16]
