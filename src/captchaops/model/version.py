"""A registered version is data: an ONNX network and a meta.json, checked before they are used.

Our servers, the gate, training and the CLI load versions only through `open_version` and
`load_registered`: they read MLmodel (YAML), meta.json and the ONNX file after checking the
flavor, the signature, the meta schema and bounds, and the ONNX file's digest. Nothing a
version carries is unpickled or imported here.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from captchaops.model.reader import OnnxReader

META_SCHEMA = 1
"""Version of the meta.json layout below; a reader refuses any other."""
PREPROCESSING = 1
"""Version of `captchaops.model.preprocess` (grayscale, transparency on white, bilinear)."""
ONNX_ARTIFACT = "onnx_model"
META_ARTIFACT = "meta"
MAX_META_BYTES = 64 * 1024
MAX_ONNX_BYTES = 64 * 2**20
SIGNATURE_INPUTS = [("image", "string")]
SIGNATURE_OUTPUTS = [("text", "string"), ("confidence", "double")]
_HEX64 = re.compile(r"[0-9a-f]{64}")


class VersionError(Exception):
    """A version that must not be served or scored; the message is one line saying why."""


class VersionMeta(BaseModel):
    """meta.json: everything needed to read a version's ONNX network, and nothing executable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1]
    alphabet: str = Field(min_length=1, max_length=256)
    min_length: int = Field(ge=1, le=64)
    max_length: int = Field(ge=1, le=64)
    height: int = Field(ge=8, le=256)
    width: int = Field(ge=8, le=2048)
    preprocessing: Literal[1]
    onnx_sha256: str
    dataset_sha256: str = ""
    scheme: str = Field(min_length=1, max_length=100)
    data_kind: Literal["folder", "synthetic"]
    model_format: Literal["onnx"] = "onnx"
    members: int = Field(1, ge=1, le=16)  # an ensemble: one ONNX output per member
    combine: Literal["max_confidence", "vote"] = "max_confidence"  # how members' answers join

    @field_validator("alphabet")
    @classmethod
    def _distinct_visible(cls, value: str) -> str:
        if len(set(value)) != len(value) or any(
            not ch.isprintable() or ch.isspace() for ch in value
        ):
            raise ValueError("the alphabet must be distinct visible characters")
        return value

    @field_validator("onnx_sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _HEX64.fullmatch(value):
            raise ValueError("must be 64 lowercase hex digits")
        return value

    @model_validator(mode="after")
    def _lengths(self) -> VersionMeta:
        if self.min_length > self.max_length:
            raise ValueError("min_length is above max_length")
        if self.width // 4 < 2 * self.max_length + 1:
            raise ValueError("the input is too narrow for the longest label")
        return self


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_meta(data: bytes) -> VersionMeta:
    """meta.json bytes as a checked VersionMeta, or VersionError in one line."""
    if len(data) > MAX_META_BYTES:
        raise VersionError(f"meta.json is {len(data):,} bytes, over {MAX_META_BYTES:,}")
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise VersionError(f"meta.json is not JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise VersionError("meta.json is not a JSON object")
    if "schema_version" not in raw:
        raise VersionError(
            "meta.json has no schema_version: the version predates checked metadata; retrain it"
        )
    try:
        return VersionMeta.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "meta.json"
        raise VersionError(f"meta.json {where}: {first['msg']}") from exc


def _inside(root: Path, relative: object, what: str) -> Path:
    if not isinstance(relative, str) or not relative:
        raise VersionError(f"MLmodel names no path for {what}")
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        raise VersionError(f"MLmodel's {what} path {relative!r} is not a file inside the model")
    return path


def _columns(spec: object) -> list[tuple[str, str]]:
    try:
        items: Any = json.loads(spec) if isinstance(spec, str) else spec
        return [(str(item["name"]), str(item["type"])) for item in items]
    except (ValueError, TypeError, KeyError) as exc:
        raise VersionError(f"MLmodel's signature cannot be read ({exc})") from exc


def check_model_dir(model_dir: Path) -> tuple[VersionMeta, Path]:
    """(meta, ONNX path) of a downloaded model folder after every check; VersionError if one fails."""
    root = Path(model_dir)
    mlmodel = root / "MLmodel"
    if not mlmodel.is_file() or mlmodel.stat().st_size > MAX_META_BYTES:
        raise VersionError("the version has no readable MLmodel file")
    try:
        spec: Any = yaml.safe_load(mlmodel.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise VersionError(f"MLmodel is not YAML ({' '.join(str(exc).split())[:200]})") from exc
    flavor = (
        (spec or {}).get("flavors", {}).get("python_function") if isinstance(spec, dict) else None
    )
    if not isinstance(flavor, dict):
        raise VersionError("the version is not an MLflow python_function model")
    if "python_model" in flavor:
        raise VersionError(
            "the version carries a pickled python_model; only models-from-code versions are "
            "loaded (retrain it with this captchaops)"
        )
    signature = spec.get("signature") or {}
    if not isinstance(signature, dict) or (
        _columns(signature.get("inputs", "[]")) != SIGNATURE_INPUTS
        or _columns(signature.get("outputs", "[]")) != SIGNATURE_OUTPUTS
    ):
        raise VersionError("the version's signature is not image -> text, confidence")
    artifacts = flavor.get("artifacts")
    if not isinstance(artifacts, dict) or {ONNX_ARTIFACT, META_ARTIFACT} - set(artifacts):
        raise VersionError("the version carries no ONNX network and meta.json artifacts")
    paths = {
        name: _inside(root, (artifacts[name] or {}).get("path"), name)
        for name in (ONNX_ARTIFACT, META_ARTIFACT)
    }
    meta = parse_meta(paths[META_ARTIFACT].read_bytes())
    onnx = paths[ONNX_ARTIFACT]
    if onnx.stat().st_size > MAX_ONNX_BYTES:
        raise VersionError(f"the ONNX network is over {MAX_ONNX_BYTES // 2**20} MiB")
    if file_sha256(onnx) != meta.onnx_sha256:
        raise VersionError("the ONNX network does not match the digest in meta.json")
    return meta, onnx


def open_version(model_dir: Path, threads: int = 1) -> OnnxReader:
    """A checked, downloaded version as a reader (ONNX Runtime, our own preprocessing)."""
    meta, onnx = check_model_dir(model_dir)
    try:
        return OnnxReader(onnx, meta.model_dump(), threads=threads)
    except Exception as exc:  # onnxruntime raises its own types for a malformed graph
        raise VersionError(
            f"ONNX Runtime cannot open the network ({' '.join(str(exc).split())[:200]})"
        ) from exc


def load_registered(tracking_uri: str, name: str, version: str, threads: int = 1) -> OnnxReader:
    """Download `models:/name/version`, check it and open it; VersionError when it fails a check."""
    import mlflow.artifacts
    from mlflow import MlflowClient

    # The version's own artifact URI: a models:/ URI would be resolved through MLflow's
    # process-wide registry URI, whatever this function is told.
    source = MlflowClient(tracking_uri, tracking_uri).get_model_version_download_uri(name, version)
    with tempfile.TemporaryDirectory(prefix="captchaops-version-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri
        )
        return open_version(Path(local), threads=threads)
