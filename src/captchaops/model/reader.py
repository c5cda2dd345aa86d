"""The one inference path: image bytes -> ONNX CTC network -> text and confidence.

Standalone on purpose (numpy, Pillow, onnxruntime and this package's `preprocess` and `ctc`,
by relative import): training's test metrics, the gate, our model servers and stock
`mlflow models serve` all run this module; the last gets a copy shipped with each version
as MLflow code, so a version loads where captchaops is not installed.

The network's contract comes from meta.json (`CONTRACT`, with our CRNN's as the defaults a
meta.json without those fields gets): the input's layout, channels and pixel scaling, and
whether the output is probabilities or logits, [B, T, C] or [T, B, C], blank first or last.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .ctc import decode_greedy
from .preprocess import InvalidImage, network_input, preprocess, unit_range

CONTRACT: dict[str, Any] = {
    "input_layout": "NHWC",
    "channels": 1,
    "pixel_scaling": "0..1",
    "pixel_mean": None,
    "pixel_std": None,
    "output_kind": "probabilities",
    "output_layout": "BTC",
    "blank": "last",
}
"""meta.json's contract fields and the values our own CRNN has (a schema-1 meta.json's)."""


class ContractError(ValueError):
    """A network whose inputs or outputs do not fit its declared contract; `fix` names the
    meta.json field values that would fit, when they can be told."""

    def __init__(self, message: str, fix: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.fix = fix or {}


def contract_of(meta: dict[str, Any]) -> dict[str, Any]:
    """The contract fields of a meta.json, our CRNN's where it names none."""
    return {key: meta.get(key, default) for key, default in CONTRACT.items()}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (also turns log-probabilities back into probabilities)."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _known(dim: object) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


MAX_CONFIDENCE = "max_confidence"
VOTE = "vote"
RULES = (MAX_CONFIDENCE, VOTE)


def better_rule(scores: dict[str, float]) -> str:
    """The combination rule with the higher validation score; a tie keeps max_confidence."""
    return max(RULES, key=lambda rule: (scores[rule], rule == MAX_CONFIDENCE))


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
    """Reads CAPTCHAs with an ONNX CTC network whose alphabet, geometry and contract come from
    `meta`."""

    def __init__(self, onnx_path: Path | str, meta: dict[str, Any], threads: int = 1) -> None:
        """`threads` > 1 decodes a batch's images side by side (Pillow's decoders and resizing
        release the GIL) and lets ONNX Runtime use as many threads for the network."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if threads > 1:  # idle ONNX threads would spin on the cores the decoding threads need
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.meta = dict(meta)
        self.contract = contract_of(self.meta)
        self._session = ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input_name = self._session.get_inputs()[0].name
        self._check_shapes()
        self._threads = threads
        self._pool = ThreadPoolExecutor(threads, "preprocess") if threads > 1 else None

    def _check_shapes(self) -> None:
        """ContractError when the graph's declared input or output shape contradicts meta.json."""
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1:
            raise ContractError(f"the network takes {len(inputs)} inputs, not one image batch")
        if inputs[0].type != "tensor(float)":
            raise ContractError(f"the network's input is {inputs[0].type}, not float32 pixels")
        shape = [_known(d) for d in inputs[0].shape]
        if len(shape) != 4:
            raise ContractError(
                f"the network's input has {len(shape)} axes, not 4 (an image batch)"
            )
        c, h, w = self.contract["channels"], int(self.meta["height"]), int(self.meta["width"])
        layout = self.contract["input_layout"]
        fitting = [
            (lay, ch)
            for lay in ("NHWC", "NCHW")
            for ch in (c, 4 - c)  # the declared channel count first, then the other (1 or 3)
            if all(
                d is None or d == v
                for d, v in zip(shape[1:], [h, w, ch] if lay == "NHWC" else [ch, h, w], strict=True)
            )
        ]
        if (layout, c) not in fitting:
            fix = {}
            if fitting:
                lay, ch = fitting[0]
                fix = {
                    k: str(v)
                    for k, v, now in (("input_layout", lay, layout), ("channels", ch, c))
                    if v != now
                }
            raise ContractError(
                f"the network's input is {_dims(shape)} but meta.json declares {layout} with "
                f"{c} channel(s) of {h}x{w}",
                fix,
            )
        out = [_known(d) for d in outputs[0].shape]
        classes = len(self.meta["alphabet"]) + 1
        if len(out) != 3:
            raise ContractError(f"the network's output has {len(out)} axes, not 3 (steps, classes)")
        if out[2] is not None and out[2] != classes:
            raise ContractError(
                f"the network outputs {out[2]} classes but the alphabet has "
                f"{classes - 1} characters plus the blank ({classes})"
            )

    def predict_images(self, images: list[bytes]) -> list[dict[str, Any]]:
        """Read each image: [{"text": ..., "confidence": ...}] in input order."""
        if not images:
            return []
        return self._read(self.tensor(images))

    def predict_pixels(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        """Read images already decoded and resized (`preprocess.to_pixels`): uint8[N, H, W, C]."""
        c = self.contract
        return self._read(
            network_input(
                unit_range(pixels),
                c["input_layout"],
                c["pixel_scaling"],
                c["pixel_mean"],
                c["pixel_std"],
            )
        )

    def _read(self, tensor: np.ndarray) -> list[dict[str, Any]]:
        members = [
            decode_greedy(probs, self.meta["alphabet"], self.contract["blank"])
            for probs in self.member_outputs(tensor)
        ]
        answers = combine_members(members, self.meta.get("combine", MAX_CONFIDENCE))
        return [{"text": text, "confidence": confidence} for text, confidence in answers]

    def tensor(self, images: list[bytes]) -> np.ndarray:
        """The network's input for a batch of image bytes, as the contract lays it out."""
        height, width = int(self.meta["height"]), int(self.meta["width"])
        c = self.contract
        batch = np.empty((len(images), height, width, c["channels"]), dtype=np.float32)

        def prepare(i: int) -> None:
            try:
                batch[i] = preprocess(images[i], height, width, channels=c["channels"])
            except InvalidImage as exc:
                raise InvalidImage(f"image {i}: {exc}") from exc

        if self._pool is None or len(images) < 2 * self._threads:
            for i in range(len(images)):
                prepare(i)
        else:
            list(self._pool.map(prepare, range(len(images))))  # re-raises the first failure
        return network_input(
            batch, c["input_layout"], c["pixel_scaling"], c["pixel_mean"], c["pixel_std"]
        )

    def outputs(self, tensor: np.ndarray, probabilities: bool = True) -> np.ndarray:
        """The network's output for an input tensor as [B, T, C], softmaxed when the contract
        says logits (unless `probabilities` is False); the blank stays where it is. For an
        ensemble, the first member's."""
        return self.member_outputs(tensor, probabilities)[0]

    def member_outputs(self, tensor: np.ndarray, probabilities: bool = True) -> list[np.ndarray]:
        """Each member's output for an input tensor, as `outputs` shapes it: one for a single
        network, one per member for an ensemble (one ONNX output each)."""
        n = len(tensor)
        found = []
        for raw in self._session.run(None, {self._input_name: tensor}):
            out = np.asarray(raw)
            if out.ndim != 3:
                raise ContractError(f"the network's output has shape {list(out.shape)}, not 3 axes")
            if self.contract["output_layout"] == "TBC":
                out = out.transpose(1, 0, 2)
            if out.shape[0] != n:
                other = "BTC" if self.contract["output_layout"] == "TBC" else "TBC"
                raise ContractError(
                    f"the output's batch axis has {out.shape[0]} items for {n} images",
                    {"output_layout": other} if out.shape[1] == n else None,
                )
            if probabilities and self.contract["output_kind"] == "logits":
                out = softmax(out)
            found.append(out)
        return found

    def read_all(self, images: list[bytes], chunk: int = 256) -> list[dict[str, Any]]:
        """`predict_images` over any number of images, `chunk` at a time (bounded memory)."""
        return [
            o
            for s in range(0, len(images), chunk)
            for o in self.predict_images(images[s : s + chunk])
        ]


def _dims(shape: list[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
