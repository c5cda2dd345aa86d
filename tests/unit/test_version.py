"""A version is data: meta.json's schema and bounds, MLmodel's flavor and signature, the ONNX digest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from captchaops.model.version import (
    META_SCHEMA,
    PREPROCESSING,
    VersionError,
    check_model_dir,
    parse_meta,
)

ONNX_BYTES = b"not really a network, but the digest check comes first"


def meta(**changes: object) -> dict[str, object]:
    values: dict[str, object] = {
        "schema_version": META_SCHEMA,
        "alphabet": "2345678bcdefgmnpwxy",
        "min_length": 5,
        "max_length": 5,
        "height": 32,
        "width": 128,
        "preprocessing": PREPROCESSING,
        "onnx_sha256": hashlib.sha256(ONNX_BYTES).hexdigest(),
        "dataset_sha256": "ab" * 32,
        "scheme": "text-captcha",
        "data_kind": "folder",
        "model_format": "onnx",
    }
    return values | changes


def model_dir(
    tmp_path: Path, flavor: dict[str, object] | None = None, **meta_changes: object
) -> Path:
    root = tmp_path / "model"
    (root / "artifacts").mkdir(parents=True)
    (root / "artifacts" / "crnn.onnx").write_bytes(ONNX_BYTES)
    (root / "artifacts" / "meta.json").write_text(json.dumps(meta(**meta_changes)))
    python_function: dict[str, object] = {
        "artifacts": {
            "meta": {"path": "artifacts/meta.json"},
            "onnx_model": {"path": "artifacts/crnn.onnx"},
        },
        "loader_module": "mlflow.pyfunc.model",
        "model_code_path": "pyfunc_code.py",
    }
    spec = {
        "flavors": {"python_function": python_function | (flavor or {})},
        "signature": {
            "inputs": '[{"type": "string", "name": "image", "required": true}]',
            "outputs": '[{"type": "string", "name": "text", "required": true}, '
            '{"type": "double", "name": "confidence", "required": true}]',
        },
    }
    (root / "MLmodel").write_text(yaml.safe_dump(spec))
    return root


def test_a_well_formed_meta_parses() -> None:
    parsed = parse_meta(json.dumps(meta()).encode())
    assert parsed.alphabet == "2345678bcdefgmnpwxy" and (parsed.height, parsed.width) == (32, 128)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"alphabet": "aab"}, "distinct visible"),
        ({"alphabet": "ab c"}, "distinct visible"),
        ({"alphabet": ""}, "alphabet"),
        ({"height": 4000}, "height"),
        ({"width": 16, "schema_version": 1}, "too narrow"),
        ({"min_length": 6}, "min_length is above"),
        ({"onnx_sha256": "xyz"}, "hex"),
        ({"schema_version": 3}, "schema_version"),
        ({"data_kind": "pickle"}, "data_kind"),
        ({"loader": "os.system"}, "loader"),
    ],
)
def test_meta_out_of_bounds_is_refused_in_one_line(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(VersionError, match=message) as info:
        parse_meta(json.dumps(meta(**changes)).encode())
    assert "\n" not in str(info.value)


def test_meta_that_is_not_a_checked_object_is_refused() -> None:
    legacy = {k: v for k, v in meta().items() if k != "schema_version"}
    with pytest.raises(VersionError, match="predates"):
        parse_meta(json.dumps(legacy).encode())
    with pytest.raises(VersionError, match="not JSON"):
        parse_meta(b"[" * 60_000)
    with pytest.raises(VersionError, match="not a JSON object"):
        parse_meta(b"[1, 2]")
    with pytest.raises(VersionError, match="over"):
        parse_meta(b" " * 100_000)


def test_a_checked_model_dir_gives_meta_and_the_onnx_path(tmp_path: Path) -> None:
    checked, onnx = check_model_dir(model_dir(tmp_path))
    assert checked.scheme == "text-captcha" and onnx.read_bytes() == ONNX_BYTES


def test_onnx_bytes_that_do_not_match_the_digest_are_refused(tmp_path: Path) -> None:
    root = model_dir(tmp_path)
    (root / "artifacts" / "crnn.onnx").write_bytes(ONNX_BYTES + b"!")
    with pytest.raises(VersionError, match="does not match the digest"):
        check_model_dir(root)


@pytest.mark.parametrize(
    ("flavor", "message"),
    [
        ({"python_model": "python_model.pkl"}, "pickled python_model"),
        ({"artifacts": {"meta": {"path": "artifacts/meta.json"}}}, "no ONNX network"),
        (
            {
                "artifacts": {
                    "meta": {"path": "../../etc/passwd"},
                    "onnx_model": {"path": "artifacts/crnn.onnx"},
                }
            },
            "not a file inside the model",
        ),
    ],
)
def test_flavors_that_would_run_or_read_other_things_are_refused(
    tmp_path: Path, flavor: dict[str, object], message: str
) -> None:
    with pytest.raises(VersionError, match=message):
        check_model_dir(model_dir(tmp_path, flavor))


def test_wrong_signature_or_missing_mlmodel_is_refused(tmp_path: Path) -> None:
    root = model_dir(tmp_path)
    spec = yaml.safe_load((root / "MLmodel").read_text())
    spec["signature"]["inputs"] = '[{"type": "double", "name": "x"}]'
    (root / "MLmodel").write_text(yaml.safe_dump(spec))
    with pytest.raises(VersionError, match="signature"):
        check_model_dir(root)
    (root / "MLmodel").unlink()
    with pytest.raises(VersionError, match="no readable MLmodel"):
        check_model_dir(root)
