"""Logging a version: ONNX network + meta.json as an MLflow models-from-code pyfunc, no pickle.

The logged model is `pyfunc_code.py` (run by MLflow's loader) plus a `captcha_runtime`
package: byte-for-byte copies of this package's reader, preprocess and ctc modules. Stock
`mlflow models serve` therefore needs only the pip requirements below (no TensorFlow, no
captchaops), and answers exactly like our servers, which read the same two artifacts
through `captchaops.model.version` without running any of it.
"""

from __future__ import annotations

import base64
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from captchaops.model.version import META_ARTIFACT, ONNX_ARTIFACT, parse_meta

RUNTIME_PACKAGE = "captcha_runtime"
"""The name the shipped copy of the inference modules is imported by in a stock environment."""
RUNTIME_MODULES = ("reader.py", "preprocess.py", "ctc.py")
CODE_FILE = Path(__file__).with_name("pyfunc_code.py")
SERVING_PACKAGES = ("mlflow", "onnxruntime", "numpy", "pillow", "pandas")
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image")]),
    outputs=Schema([ColSpec("string", "text"), ColSpec("double", "confidence")]),
)


def pip_requirements() -> list[str]:
    """Pinned packages the served model needs (no TensorFlow, no captchaops)."""
    return [f"{name}=={version(name)}" for name in SERVING_PACKAGES]


def runtime_package(dest: Path) -> Path:
    """Copy the inference modules into `dest/captcha_runtime/` (shipped with each version)."""
    package = Path(dest) / RUNTIME_PACKAGE
    package.mkdir(parents=True)
    here = Path(__file__).parent
    for name in RUNTIME_MODULES:
        shutil.copyfile(here / name, package / name)
    (package / "__init__.py").write_text('"""captchaops inference modules, shipped as code."""\n')
    return package


@contextmanager
def _importable(folder: Path) -> Iterator[None]:
    """MLflow runs the code file while logging (to check the input example): let it import."""
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        for name in [m for m in sys.modules if m.split(".")[0] == RUNTIME_PACKAGE]:
            del sys.modules[name]


def log_model(
    onnx_path: Path,
    meta: dict[str, Any],
    example_image: bytes,
) -> mlflow.models.model.ModelInfo:
    """Log the servable pyfunc (ONNX network and checked meta.json) into the active run.

    It is not registered here: `registry.register_version` makes a version of it."""
    checked = parse_meta(json.dumps(meta).encode())  # never register a version we would refuse
    with tempfile.TemporaryDirectory() as tmp:
        meta_path = Path(tmp) / "meta.json"
        meta_path.write_text(json.dumps(checked.model_dump(), indent=2))
        runtime = runtime_package(Path(tmp) / "code")
        example = pd.DataFrame({"image": [base64.b64encode(example_image).decode("ascii")]})
        with _importable(runtime.parent):
            return mlflow.pyfunc.log_model(
                name="model",
                python_model=str(CODE_FILE),
                artifacts={ONNX_ARTIFACT: str(onnx_path), META_ARTIFACT: str(meta_path)},
                code_paths=[str(runtime)],
                pip_requirements=pip_requirements(),
                signature=SIGNATURE,
                input_example=example,
            )
