"""The registered, served model: base64 image bytes in, `text` + `confidence` out, on ONNX Runtime."""

from __future__ import annotations

import base64
import binascii
import json
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnxruntime as ort
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, Schema

from captchaops.model.ctc import decode_greedy
from captchaops.model.preprocess import InvalidImage, preprocess

ONNX_ARTIFACT = "onnx_model"
META_ARTIFACT = "meta"
SERVING_PACKAGES = ("mlflow", "onnxruntime", "numpy", "pillow", "pandas")
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image")]),
    outputs=Schema([ColSpec("string", "text"), ColSpec("double", "confidence")]),
)


class CaptchaModel(PythonModel):
    """Reads CAPTCHAs with an ONNX CRNN; alphabet and geometry travel in `meta`."""

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        self.meta: dict[str, Any] = {}
        self._session: Any = None
        self._input_name = ""

    def load_context(self, context: PythonModelContext) -> None:
        """Open the ONNX network and read its metadata."""
        self.load(Path(context.artifacts[ONNX_ARTIFACT]), Path(context.artifacts[META_ARTIFACT]))

    def load(self, onnx_path: Path, meta_path: Path) -> None:
        """Open an ONNX network file and its metadata JSON."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input_name = self._session.get_inputs()[0].name
        self.meta = json.loads(meta_path.read_text())

    def predict_images(self, images: list[bytes]) -> list[dict[str, Any]]:
        """Read each image: [{"text": ..., "confidence": ...}] in input order."""
        if not images:
            return []
        height, width = int(self.meta["height"]), int(self.meta["width"])
        batch = np.empty((len(images), height, width, 1), dtype=np.float32)
        for i, data in enumerate(images):
            try:
                batch[i] = preprocess(data, height, width)
            except InvalidImage as exc:
                raise InvalidImage(f"image {i}: {exc}") from exc
        probs = self._session.run(None, {self._input_name: batch})[0]
        return [
            {"text": text, "confidence": confidence}
            for text, confidence in decode_greedy(probs, self.meta["alphabet"])
        ]

    def predict(
        self,
        context: PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Column `image` of base64 strings in; columns `text` and `confidence` out."""
        if "image" not in model_input.columns:
            raise InvalidImage("the input needs a column named 'image' with base64-encoded images")
        images = [_b64decode(value, i) for i, value in enumerate(model_input["image"].tolist())]
        rows = self.predict_images(images)
        return pd.DataFrame(rows, columns=["text", "confidence"])


def _b64decode(value: object, index: int) -> bytes:
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if not isinstance(value, str):
        raise InvalidImage(f"image {index}: expected a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage(f"image {index}: not valid base64 ({exc})") from exc


def pip_requirements() -> list[str]:
    """Pinned packages the served model needs (no TensorFlow)."""
    return [f"{name}=={version(name)}" for name in SERVING_PACKAGES]


def log_model(
    onnx_path: Path,
    meta: dict[str, Any],
    example_image: bytes,
    registered_model_name: str | None = None,
) -> mlflow.models.model.ModelInfo:
    """Log the servable pyfunc (ONNX network and its metadata) into the active run.

    The model's class lives in `captchaops.model.pyfunc`, so captchaops must be importable
    where the model is loaded (our servers, the web app, `mlflow models serve --env-manager
    local` in this environment); nothing else beyond the pip requirements is needed.
    """
    with tempfile.TemporaryDirectory() as tmp:
        meta_path = Path(tmp) / "meta.json"
        meta_path.write_text(json.dumps(meta, indent=2))
        example = pd.DataFrame({"image": [base64.b64encode(example_image).decode("ascii")]})
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=CaptchaModel(),
            artifacts={ONNX_ARTIFACT: str(onnx_path), META_ARTIFACT: str(meta_path)},
            pip_requirements=pip_requirements(),
            signature=SIGNATURE,
            input_example=example,
            registered_model_name=registered_model_name,
        )
