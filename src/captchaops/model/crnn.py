"""The Keras 3 CRNN (convolutions + one bidirectional GRU) with CTC loss, written with keras.ops only."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import keras
from keras import KerasTensor, layers, ops


@dataclass(frozen=True)
class Architecture:
    """Network shape; logged with every run and enough to rebuild the network."""

    height: int = 32
    width: int = 80
    filters: tuple[int, ...] = (16, 32, 48, 64)
    rnn_units: int = 64
    dropout: float = 0.2
    augment_strength: float = 1.0  # scales every jitter of the training-only augmentation

    @property
    def time_steps(self) -> int:
        """CTC output steps: the width after the two 2x2 poolings."""
        return self.width // 4

    def params(self) -> dict[str, object]:
        """Flat parameters for MLflow."""
        return {f"arch_{k}": v for k, v in asdict(self).items()} | {
            "arch_time_steps": self.time_steps
        }


def _conv(x: KerasTensor, filters: int, name: str) -> KerasTensor:
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def _augmentation(strength: float = 1.0) -> keras.Sequential:
    """Jitter suited to real scans and photos (geometry, blur, contrast, noise); training only.

    `strength` scales every amount (1.0: the values the presets were measured with)."""
    s = strength
    return keras.Sequential(
        [
            layers.RandomTranslation(0.08 * s, 0.04 * s, fill_mode="nearest"),
            layers.RandomRotation(0.015 * s, fill_mode="nearest"),
            layers.RandomZoom(0.08 * s, fill_mode="nearest"),
            layers.RandomGaussianBlur(
                min(1.0, 0.5 * s), kernel_size=3, sigma=(0.1, 1.0), value_range=(0, 1)
            ),
            layers.RandomContrast(min(1.0, 0.3 * s), value_range=(0, 1)),
            layers.GaussianNoise(0.03 * s),
        ],
        name="augment",
    )


def build_crnn(
    arch: Architecture, num_classes: int, augment: bool = False
) -> tuple[keras.Model, keras.Model]:
    """(training model with logits out, inference model with softmax probs [B, T, C] out)."""
    image = keras.Input(shape=(arch.height, arch.width, 1), name="image")
    x = image
    pools = [(2, 2), (2, 2)] + [(2, 1)] * (len(arch.filters) - 2)
    for i, (filters, pool) in enumerate(zip(arch.filters, pools, strict=True)):
        x = _conv(x, filters, f"block{i + 1}")
        x = layers.MaxPooling2D(pool, name=f"block{i + 1}_pool")(x)
    _, h, w, c = x.shape
    x = layers.Permute((2, 1, 3), name="to_sequence")(x)
    x = layers.Reshape((w, h * c), name="flatten_height")(x)
    x = layers.Dense(arch.rnn_units * 2, activation="relu", name="project")(x)
    x = layers.Dropout(arch.dropout, name="dropout")(x)
    x = layers.Bidirectional(
        layers.GRU(arch.rnn_units, return_sequences=True, reset_after=True, unroll=True),
        name="bigru",
    )(x)
    logits = layers.Dense(num_classes, name="logits")(x)
    probs = layers.Softmax(name="probs")(logits)
    infer = keras.Model(image, probs, name="crnn")
    if not augment:
        return keras.Model(image, logits, name="crnn_train"), infer
    trunk = keras.Model(image, logits, name="crnn_logits")
    train_input = keras.Input(shape=(arch.height, arch.width, 1), name="image")
    return keras.Model(
        train_input, trunk(_augmentation(arch.augment_strength)(train_input)), name="crnn_train"
    ), infer


def ctc_loss(y_true: Any, y_pred: Any) -> Any:
    """Mean CTC loss; labels are int [B, L] padded with -1, blank is the last class."""
    labels = ops.cast(y_true, "int32")
    y_pred = ops.cast(y_pred, "float32")  # the loss in float32 under mixed precision too
    label_length = ops.sum(ops.cast(labels >= 0, "int32"), axis=1)
    labels = ops.where(labels >= 0, labels, ops.zeros_like(labels))
    batch = ops.shape(y_pred)[0]
    steps = ops.shape(y_pred)[1]
    logit_length = ops.full((batch,), steps, dtype="int32")
    loss = ops.ctc_loss(
        labels, y_pred, label_length, logit_length, mask_index=ops.shape(y_pred)[2] - 1
    )
    return ops.mean(loss)
