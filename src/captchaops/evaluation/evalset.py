"""The frozen evaluation set: made once, stored by digest on the tracking server, scored through pyfunc.

Every function that reads or writes the tracking server takes the caller's `MlflowClient`.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass
from dataclasses import replace as with_fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import read_mlflow_creds

from captchaops import mlflow_scope
from captchaops.data.dataset import DataError, LabelledImages, split_of
from captchaops.data.folder import read_folder
from captchaops.data.frozen import (
    ARTIFACT,
    DIGEST_TAG,
    EVAL_EXPERIMENT,
    MAX_SET_BYTES,
    ArchiveRefused,
    digest_of,
    pack,
    unpack,
)
from captchaops.data.synthetic import DIGITS_UPPER, generate
from captchaops.evaluation.accuracy import character_error_rate, sequence_accuracy
from captchaops.evaluation.scheme import Scheme
from captchaops.live.estimate import Calibration
from captchaops.model.version import VersionError, load_registered
from captchaops.registry.aliases import signing_key_dir
from captchaops.registry.errors import RegistryError
from captchaops.registry.versions import pin_evalset
from captchaops.settings import Settings, mask_credentials
from captchaops.tracking_rest import ArtifactTooLarge, TrackingError, TrackingRest

EVAL_SEED = 7_919_000
"""Seed of the generated part of the frozen set; training must never use it (see docs)."""
SCORE_TAGS = ("seq_acc", "cer", "p50_ms", "p95_ms")


class EvalSetError(RegistryError):
    """A frozen-set problem a user can fix; the message is one line with the fix. The set is
    pinned to the registered model, so it is a registry error to whoever reports those."""


@dataclass(frozen=True)
class EvalSet:
    """Labelled images every version is judged on, identified by the digest of their content."""

    images: list[bytes]
    labels: list[str]
    digest: str
    seed: int
    kind: str = "synthetic"
    """'synthetic' (generated with a fixed seed) or 'folder' (held-out images of a folder scheme)."""
    unpinned_run: str = ""
    """The run holding a set logged but not pinned yet: where a promotion service signs for the
    stack (CAPTCHAOPS_PROMOTIONS_URL), it pins the set from this run (`pin_logged`)."""

    def __len__(self) -> int:
        return len(self.labels)

    def alphabet(self) -> str:
        """Every character the labels use, sorted."""
        return "".join(sorted(set("".join(self.labels))))

    def unseen(self, images: list[bytes]) -> list[int]:
        """Indices of the `images` whose content (sha256) is not in the set: what may be trained on."""
        held = {hashlib.sha256(image).digest() for image in self.images}
        return [i for i, image in enumerate(images) if hashlib.sha256(image).digest() not in held]


@dataclass(frozen=True)
class Score:
    """One version's result on the frozen set; `error` is set when it failed to load or predict."""

    version: str
    digest: str
    seq_acc: float = 0.0
    cer: float = 1.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    n: int = 0
    error: str | None = None
    calibration: Calibration | None = None  # its confidence threshold for the live estimate

    @property
    def ok(self) -> bool:
        """Whether the version loaded and predicted every image."""
        return self.error is None

    def metrics(self, prefix: str) -> dict[str, float]:
        """The numbers as MLflow metrics named `<prefix>_<metric>` (empty when it failed)."""
        if not self.ok:
            return {}
        return {f"{prefix}_{key}": float(getattr(self, key)) for key in SCORE_TAGS}


def _unpack(data: bytes) -> EvalSet:
    meta, images, labels = unpack(data)
    kind = str(meta.get("kind", "synthetic"))
    return EvalSet(images, labels, digest_of(images, labels), int(meta["seed"]), kind)


def _download(client: MlflowClient, run_id: str) -> bytes:
    """A run's `evalset.zip`, the download itself stopped at MAX_SET_BYTES (ArtifactTooLarge).

    A tracking server streams it through `GET /get-artifact` with the client's login (in its
    URI, else MLflow's environment or ~/.mlflow/credentials); a local store is read from disk.
    """
    uri = str(client.tracking_uri)
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        creds = read_mlflow_creds()
        login = None
        if not parts.username and creds.username and creds.password:
            login = (creds.username, creds.password)
        rest = TrackingRest(uri, login, 60.0)
        try:
            return rest.get_artifact(run_id, ARTIFACT, MAX_SET_BYTES)
        finally:
            rest.close()
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run_id, ARTIFACT, tmp))
        if local.stat().st_size > MAX_SET_BYTES:
            raise ArtifactTooLarge(f"{ARTIFACT} is larger than {MAX_SET_BYTES / 2**20:g} MiB")
        return local.read_bytes()


def _experiment_id(client: MlflowClient) -> str:
    return mlflow_scope.experiment_id(client, EVAL_EXPERIMENT, {"kind": "evalset"})


def current_digest(client: MlflowClient, settings: Settings) -> str | None:
    """Digest of the frozen set the registered model is judged on, if one was made."""
    try:
        model = client.get_registered_model(settings.model_name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return model.tags.get(DIGEST_TAG)


def create_evalset(
    client: MlflowClient,
    settings: Settings,
    *,
    size: int = 2000,
    seed: int = EVAL_SEED,
    folder: Path | None = None,
    alphabet: str = DIGITS_UPPER,
    length: tuple[int, int] = (4, 4),
    replace: bool = False,
) -> EvalSet:
    """Generate (plus an optional labelled folder), store and pin the frozen set for the model."""
    existing = current_digest(client, settings)
    if existing and not replace:
        raise EvalSetError(
            f"{settings.model_name} already has a frozen evaluation set ({existing[:12]}); "
            "pass --replace to make a new one"
        )
    samples = generate(size, seed, alphabet=alphabet, length=length, workers=2)
    images = [s.image for s in samples]
    labels = [s.label for s in samples]
    if folder is not None:
        try:
            extra = read_folder(folder, alphabet=alphabet if size else None)
        except DataError as exc:
            raise EvalSetError(str(exc)) from exc
        images += extra.images
        labels += extra.labels
    if not labels:
        raise EvalSetError("the frozen set would be empty; pass --size above 0 or a --folder")
    evalset = EvalSet(
        images, labels, digest_of(images, labels), seed, "synthetic" if size else "folder"
    )
    meta = {
        "seed": seed,
        "generated": size,
        "folder": str(folder) if folder else "",
        "folder_images": len(labels) - size,
        "alphabet": alphabet,
        "length": list(length),
    }
    return _store(client, settings, evalset, meta)


def _store(
    client: MlflowClient, settings: Settings, evalset: EvalSet, meta: dict[str, object]
) -> EvalSet:
    """Log the set as an MLflow run artifact and pin it to the registered model by digest,
    signed; where a promotion service signs, leave the pin to it (`unpinned_run`)."""
    meta = meta | {"kind": evalset.kind, "images": len(evalset)}
    run = client.create_run(
        _experiment_id(client),
        run_name=f"evalset {settings.model_name} {evalset.digest[:12]}",
        tags={DIGEST_TAG: evalset.digest, "kind": "evalset", "model_name": settings.model_name},
    )
    client.log_batch(
        run.info.run_id,
        params=[mlflow.entities.Param(k, str(v)[:500]) for k, v in meta.items()],
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ARTIFACT
        path.write_bytes(pack(evalset.images, evalset.labels, meta))
        client.log_artifact(run.info.run_id, str(path))
    mlflow_scope.finish_run(client, run.info.run_id)
    if settings.promotions_url:
        return with_fields(evalset, unpinned_run=run.info.run_id)
    pin_evalset(
        client,
        settings.model_name,
        evalset.digest,
        evalset.seed,
        evalset.kind,
        key_dir=signing_key_dir(settings),
    )
    return evalset


def pin_logged(
    client: MlflowClient, settings: Settings, run_id: str, *, replace_set: bool, actor: str
) -> EvalSet:
    """Pin the frozen set logged in `run_id`, signed with the settings' key, by the digest
    computed here from the archive itself (never the digest the run's tags claim); a one-line
    EvalSetError when the run is not a stored set of this scheme, its archive is refused or
    does not match its tag, or the scheme has another set and `replace_set` is false."""
    name = settings.model_name
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise EvalSetError(
            f"no run {run_id[:40]!r}; log the set with `captchaops evalset`"
        ) from exc
    tags = run.data.tags
    if (
        run.info.experiment_id != _experiment_id(client)
        or tags.get("kind") != "evalset"
        or tags.get("model_name") != name
    ):
        raise EvalSetError(
            f"run {run_id[:12]} is not a stored frozen set of {name}; make one with "
            "`captchaops evalset`"
        )
    existing = current_digest(client, settings)
    short = tags.get(DIGEST_TAG, "")[:12]
    try:
        evalset = _unpack(_download(client, run_id))
    except (ArtifactTooLarge, TrackingError, ArchiveRefused) as exc:
        raise EvalSetError(
            f"the frozen set logged in run {run_id[:12]} is refused ({exc}); make it again with "
            "`captchaops evalset --replace`"
        ) from exc
    if evalset.digest != tags.get(DIGEST_TAG):
        raise EvalSetError(
            f"the archive of run {run_id[:12]} is not the set {short} it claims (its content's "
            f"digest is {evalset.digest[:12]}); make it again with `captchaops evalset --replace`"
        )
    if existing and existing != evalset.digest and not replace_set:
        raise EvalSetError(
            f"{name} already has a frozen evaluation set ({existing[:12]}); "
            "pass --replace to make a new one"
        )
    pin_evalset(
        client,
        name,
        evalset.digest,
        evalset.seed,
        evalset.kind,
        actor=actor,
        key_dir=signing_key_dir(settings),
    )
    return evalset


def holdout_indices(names: list[str], fraction: float) -> list[int]:
    """Which files of a folder are held out for its frozen set: decided by hashing each name.

    Salted differently from the train/validation split, so it does not mirror it.
    """
    return [
        i for i, name in enumerate(names) if split_of(f"evalset/{name}", 0.0, fraction) == "test"
    ]


def folder_evalset(
    client: MlflowClient, settings: Settings, data: LabelledImages, fraction: float
) -> EvalSet:
    """A folder scheme's frozen set: the stored one, or held-out images of `data` frozen now.

    Training must leave out every image whose content is in the returned set.
    """
    digest = current_digest(client, settings)
    if digest:
        evalset = load_evalset(client, digest)
        if evalset.kind != "folder":
            raise EvalSetError(
                f"{settings.model_name} is judged on generated CAPTCHAs, not on held-out images "
                f"of a folder; train this folder as its own scheme with --model-name NAME"
            )
        return evalset
    held = holdout_indices(data.names, fraction)
    if len(held) < 5 or len(held) > len(data) - 10:
        raise EvalSetError(
            f"{len(data)} images are too few to hold out a frozen evaluation set; add more images"
        )
    images = [data.images[i] for i in held]
    labels = [data.labels[i] for i in held]
    evalset = EvalSet(images, labels, digest_of(images, labels), 0, "folder")
    meta = {
        "seed": 0,
        "generated": 0,
        "folder": data.source[:400],
        "folder_images": len(held),
        "holdout_fraction": fraction,
        "alphabet": data.alphabet(),
        "length": [min(map(len, labels)), max(map(len, labels))],
    }
    return _store(client, settings, evalset, meta)


def load_evalset(client: MlflowClient, digest: str) -> EvalSet:
    """The stored frozen set with this digest, verified against its content."""
    experiment = client.get_experiment_by_name(EVAL_EXPERIMENT)
    runs = (
        client.search_runs(
            [experiment.experiment_id], f"tags.{DIGEST_TAG} = '{digest}'", max_results=1
        )
        if experiment is not None
        else []
    )
    if not runs:
        raise EvalSetError(
            f"no stored frozen evaluation set with digest {digest[:12]}; "
            "make one with `captchaops evalset --replace`"
        )
    short = digest[:12]
    try:
        evalset = _unpack(_download(client, runs[0].info.run_id))
    except ArtifactTooLarge as exc:
        raise EvalSetError(
            f"the stored frozen set {short} is larger than {MAX_SET_BYTES / 2**20:g} MiB; "
            "make a new one with `captchaops evalset --replace`"
        ) from exc
    except TrackingError as exc:
        raise EvalSetError(
            f"the stored frozen set {short} could not be downloaded ({exc}); retry, or make a "
            "new one with `captchaops evalset --replace`"
        ) from exc
    except ArchiveRefused as exc:
        raise EvalSetError(
            f"the stored frozen set {short} is refused: {exc}; "
            "make a new one with `captchaops evalset --replace`"
        ) from exc
    if evalset.digest != digest:
        raise EvalSetError(
            f"the stored frozen set {digest[:12]} does not match its digest; "
            "make a new one with `captchaops evalset --replace`"
        )
    return evalset


def ensure_evalset(
    client: MlflowClient, settings: Settings, size: int = 2000, scheme: Scheme | None = None
) -> EvalSet:
    """The model's frozen set; on first use generated with the default seed, in the alphabet
    and lengths of `scheme` when it is a synthetic one (else digits + uppercase, 4 long)."""
    digest = current_digest(client, settings)
    if digest:
        return load_evalset(client, digest)
    if scheme is not None and scheme.data_kind == "synthetic":
        length = (scheme.min_length, scheme.max_length)
        return create_evalset(client, settings, size=size, alphabet=scheme.alphabet, length=length)
    return create_evalset(client, settings, size=size)


def score(
    settings: Settings,
    version: str,
    evalset: EvalSet,
    *,
    batch_size: int = 64,
    latency_samples: int = 50,
    readings: list[dict[str, Any]] | None = None,
    client: MlflowClient | None = None,
) -> Score:
    """Accuracy, CER and single-image latency of a version, checked and loaded as servers load
    it; its answers are added to `readings` when one is given (for its report)."""
    try:
        model = load_registered(
            mlflow_scope.tracking_uri(settings), settings.model_name, version, client=client
        )
        outputs = model.read_all(evalset.images, chunk=batch_size)
        if readings is not None:
            readings.extend(outputs)
        texts = [o["text"] for o in outputs]
        latencies = []
        for image in evalset.images[:latency_samples]:
            began = time.perf_counter()
            model.predict_images([image])
            latencies.append((time.perf_counter() - began) * 1000)
    except VersionError as exc:  # refused by a check: nothing of it ran
        return Score(version, evalset.digest, error=f"refused: {exc}")
    except Exception as exc:  # a broken model may fail in any library; the gate rejects it
        first = mask_credentials((str(exc).strip().splitlines() or [""])[0])[:300]
        return Score(version, evalset.digest, error=f"{type(exc).__name__}: {first}")
    return Score(
        version=version,
        digest=evalset.digest,
        seq_acc=sequence_accuracy(texts, evalset.labels),
        cer=character_error_rate(texts, evalset.labels),
        p50_ms=float(np.percentile(latencies, 50)) if latencies else 0.0,
        p95_ms=float(np.percentile(latencies, 95)) if latencies else 0.0,
        n=len(evalset),
        calibration=Calibration.fit(
            [o["confidence"] for o in outputs],
            [t == label for t, label in zip(texts, evalset.labels, strict=True)],
        )
        if outputs
        else None,
    )
