"""The registered pyfunc as MLflow models-from-code: what stock `mlflow models serve` runs.

MLflow executes this file when it loads a version (nothing is unpickled). It imports only
MLflow, pandas and `captcha_runtime`, a copy of `captchaops.model`'s reader, preprocess and
ctc modules shipped with the version as code, so captchaops need not be installed. Our own
servers, the gate and the CLI never run it: they read the ONNX file and meta.json directly
(`captchaops.model.version`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from captcha_runtime.preprocess import InvalidImage, b64decode_image
from captcha_runtime.reader import OnnxReader
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel, PythonModelContext


class CaptchaModel(PythonModel):
    """Column `image` of base64 strings in; columns `text` and `confidence` out."""

    def load_context(self, context: PythonModelContext) -> None:
        """Open the ONNX network with the alphabet and geometry from meta.json."""
        meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.reader = OnnxReader(context.artifacts["onnx_model"], meta)

    def predict(
        self,
        context: PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Read every image of the `image` column."""
        if "image" not in model_input.columns:
            raise InvalidImage("the input needs a column named 'image' with base64-encoded images")
        images = [
            b64decode_image(value, i) for i, value in enumerate(model_input["image"].tolist())
        ]
        return pd.DataFrame(self.reader.predict_images(images), columns=["text", "confidence"])


set_model(CaptchaModel())
