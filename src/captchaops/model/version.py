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
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from captchaops.model.reader import CONTRACT, ContractError, OnnxReader

META_SCHEMA = 2
"""Version of the meta.json layout below: 2 declares the network's input and output contract,
1 (versions trained before it) has our CRNN's; a reader refuses any other."""
PREPROCESSING = 1
"""Version of `captchaops.model.preprocess` (grayscale, transparency on white, bilinear)."""
ONNX_ARTIFACT = "onnx_model"
META_ARTIFACT = "meta"
MAX_META_BYTES = 64 * 1024
MAX_ONNX_BYTES = 64 * 2**20
SIGNATURE_INPUTS = [("image", "string")]
SIGNATURE_OUTPUTS = [("text", "string"), ("confidence", "double")]
_HEX64 = re.compile(r"[0-9a-f]{64}")
_Pixel = Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]


class VersionError(Exception):
    """A version that must not be served or scored; the message is one line saying why."""


class VersionMeta(BaseModel):
    """meta.json: everything needed to read a version's ONNX network, and nothing executable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1, 2]
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
    onnx_ops: tuple[str, ...] = ()
    """The graph's operator types, recorded at export (`graph_policy.op_set`); empty in older
    versions."""
    input_layout: Literal["NHWC", "NCHW"] = "NHWC"
    channels: Literal[1, 3] = 1
    pixel_scaling: Literal["0..1", "-1..1", "mean_std"] = "0..1"
    """`mean_std`: (x - pixel_mean) / pixel_std per channel, x in [0, 1] (torchvision's Normalize)."""
    pixel_mean: list[_Pixel] | None = Field(default=None, min_length=1, max_length=3)
    pixel_std: list[_Pixel] | None = Field(default=None, min_length=1, max_length=3)
    output_kind: Literal["probabilities", "logits"] = "probabilities"
    """`logits` are put through a softmax (log-probabilities too: softmax(log p) = p)."""
    output_layout: Literal["BTC", "TBC"] = "BTC"
    blank: Literal["first", "last"] = "last"
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
        # Schema 1 is our CRNN, whose time steps are the width / 4; a declared contract's
        # network has its own, checked against the labels when it is registered.
        if self.schema_version == 1 and self.width // 4 < 2 * self.max_length + 1:
            raise ValueError("the input is too narrow for the longest label")
        return self

    @model_validator(mode="after")
    def _contract(self) -> VersionMeta:
        if self.schema_version == 1 and self.contract() != CONTRACT:
            raise ValueError("schema_version 1 has no contract fields; declare schema_version 2")
        scaled = self.pixel_scaling == "mean_std"
        for name, values in (("pixel_mean", self.pixel_mean), ("pixel_std", self.pixel_std)):
            if scaled != (values is not None):
                raise ValueError(f"{name} goes with pixel_scaling mean_std, and only with it")
            if values is not None and len(values) != self.channels:
                raise ValueError(f"{name} needs one value per channel ({self.channels})")
        if self.pixel_std is not None and min(abs(v) for v in self.pixel_std) < 1e-6:
            raise ValueError("pixel_std values must not be zero")
        return self

    def contract(self) -> dict[str, Any]:
        """The input/output contract fields (the reader's `CONTRACT` keys)."""
        return {key: getattr(self, key) for key in CONTRACT}


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


def open_version(model_dir: Path, threads: int = 1, check_ops: bool = True) -> OnnxReader:
    """A checked, downloaded version as a reader (ONNX Runtime, our own preprocessing); the graph
    policy is checked unless the caller has (a model server's trial in a child process)."""
    meta, onnx = check_model_dir(model_dir)
    if check_ops:
        # here, not at the top: it loads onnx (~24 MB, 0.7 s); model servers import this module
        # and open versions with check_ops=False (their trial child checks the graph)
        from captchaops.model.graph_policy import GraphRefused, check_graph, input_geometry

        try:
            ops = check_graph(onnx, geometry=input_geometry(meta))
        except GraphRefused as exc:
            raise VersionError(str(exc)) from exc
        if meta.onnx_ops and sorted(meta.onnx_ops) != ops:
            raise VersionError("the graph's operators differ from those meta.json records")
    try:
        return OnnxReader(onnx, meta.model_dump(), threads=threads)
    except ContractError as exc:
        raise VersionError(str(exc)) from exc
    except Exception as exc:  # onnxruntime raises its own types for a malformed graph
        raise VersionError(
            f"ONNX Runtime cannot open the network ({' '.join(str(exc).split())[:200]})"
        ) from exc


def load_registered(
    tracking_uri: str, name: str, version: str, threads: int = 1, client: Any = None
) -> OnnxReader:
    """Download `models:/name/version`, check it and open it; VersionError when it fails a check.

    `client` is the caller's `MlflowClient` for `tracking_uri`, when it has one.
    """
    # here, not at the top: model servers and the web app import this module and stay MLflow-free
    import mlflow.artifacts
    from mlflow import MlflowClient

    # The version's own artifact URI: a models:/ URI would be resolved through MLflow's
    # process-wide registry URI, whatever this function is told.
    client = client or MlflowClient(tracking_uri, tracking_uri)
    source = client.get_model_version_download_uri(name, version)
    with tempfile.TemporaryDirectory(prefix="captchaops-version-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri
        )
        return open_version(Path(local), threads=threads)
