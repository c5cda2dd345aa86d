"""The one inference path: image bytes -> ONNX CRNN -> text and confidence.

Standalone on purpose (numpy, Pillow, onnxruntime and this package's `preprocess` and `ctc`,
by relative import): training's test metrics, the gate, our model servers and stock
`mlflow models serve` all run this module; the last gets a copy shipped with each version
as MLflow code, so a version loads where captchaops is not installed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .ctc import decode_greedy
from .preprocess import InvalidImage, preprocess

MAX_CONFIDENCE = "max_confidence"
VOTE = "vote"


def combine_members(
    members: list[list[tuple[str, float]]], rule: str = MAX_CONFIDENCE
) -> list[tuple[str, float]]:
    """One (text, confidence) per image from each ensemble member's decoded answers.

    CTC members trained apart do not share an alignment, so their per-step probabilities are
    not averaged; their decoded strings are combined instead. `max_confidence`: the most
    confident member's answer. `vote`: the string with the largest summed confidence, its
    confidence that sum over the number of members. One member passes through unchanged.
    """
    if len(members) == 1:
        return members[0]
    out: list[tuple[str, float]] = []
    for answers in zip(*members, strict=True):
        if rule == VOTE:
            votes: dict[str, float] = {}
            for text, confidence in answers:
                votes[text] = votes.get(text, 0.0) + confidence
            text = max(votes, key=lambda t: votes[t])
            out.append((text, votes[text] / len(answers)))
        else:
            out.append(max(answers, key=lambda answer: answer[1]))
    return out


class OnnxReader:
    """Reads CAPTCHAs with an ONNX CRNN whose alphabet and geometry come from `meta`."""

    def __init__(self, onnx_path: Path | str, meta: dict[str, Any], threads: int = 1) -> None:
        """`threads` > 1 decodes a batch's images side by side (Pillow's decoders and resizing
        release the GIL) and lets ONNX Runtime use as many threads for the network."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if threads > 1:  # idle ONNX threads would spin on the cores the decoding threads need
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.meta = dict(meta)
        self._session = ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input_name = self._session.get_inputs()[0].name
        self._threads = threads
        self._pool = ThreadPoolExecutor(threads, "preprocess") if threads > 1 else None

    def predict_images(self, images: list[bytes]) -> list[dict[str, Any]]:
        """Read each image: [{"text": ..., "confidence": ...}] in input order."""
        if not images:
            return []
        height, width = int(self.meta["height"]), int(self.meta["width"])
        batch = np.empty((len(images), height, width, 1), dtype=np.float32)

        def prepare(i: int) -> None:
            try:
                batch[i] = preprocess(images[i], height, width)
            except InvalidImage as exc:
                raise InvalidImage(f"image {i}: {exc}") from exc

        if self._pool is None or len(images) < 2 * self._threads:
            for i in range(len(images)):
                prepare(i)
        else:
            list(self._pool.map(prepare, range(len(images))))  # re-raises the first failure
        outputs = self._session.run(None, {self._input_name: batch})
        members = [decode_greedy(probs, self.meta["alphabet"]) for probs in outputs]
        answers = combine_members(members, self.meta.get("combine", MAX_CONFIDENCE))
        return [{"text": text, "confidence": confidence} for text, confidence in answers]

    def read_all(self, images: list[bytes], chunk: int = 256) -> list[dict[str, Any]]:
        """`predict_images` over any number of images, `chunk` at a time (bounded memory)."""
        return [
            o
            for s in range(0, len(images), chunk)
            for o in self.predict_images(images[s : s + chunk])
        ]
