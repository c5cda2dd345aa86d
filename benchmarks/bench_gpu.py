"""One GPU, at most 10 minutes: held-out accuracy of the GPU preset on fresh CAPTCHAs.

Target (issue 12): >= 99.6% sequence accuracy on 2,000 fresh 4-character CAPTCHAs after at
most 10 minutes of training on one H100/H200-class GPU. Runs the project's own training loop
(`captchaops.training.loop.fit`, the loop `captchaops train` runs inside its MLflow run) with
Keras on JAX, so it needs neither MLflow nor TensorFlow on the GPU machine:

    KERAS_BACKEND=jax python -m benchmarks.bench_gpu [--minutes 8] [--images 400000] [--out DIR]

Elsewhere (no JAX GPU) it prints that it was skipped. The test images are the Keras network's
reads of fresh seeds; the ONNX export needs TensorFlow and is not part of this measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")


def _gpu() -> str | None:
    """The accelerator JAX sees, or None."""
    try:
        import jax
    except ImportError:
        return None
    devices = [d for d in jax.devices() if d.platform == "gpu"]
    return str(devices[0].device_kind) if devices else None


def run(minutes: float, images: int, out: Path | None, test_sizes: tuple[int, ...]) -> dict:
    import keras
    import numpy as np

    from captchaops.data import synthetic
    from captchaops.data.dataset import split_indices
    from captchaops.evaluation.accuracy import character_error_rate, sequence_accuracy
    from captchaops.model.ctc import decode_greedy, encode_labels
    from captchaops.training.config import TrainConfig
    from captchaops.training.loop import Validation, fit

    start = time.monotonic()
    config = replace(TrainConfig.gpu(), max_minutes=minutes, synthetic=images)
    arch, alphabet = config.arch, synthetic.DIGITS_UPPER
    keras.utils.set_random_seed(config.seed)
    log_path = out / "epochs.jsonl" if out else None

    def note(record: dict) -> None:
        print(json.dumps(record), flush=True)
        if log_path:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    samples = synthetic.generate(
        config.synthetic,
        config.seed,
        alphabet=alphabet,
        length=config.length,
        workers=config.workers,
        preprocess_to=(arch.height, arch.width),
    )
    generated = time.monotonic() - start
    note({"stage": "generated", "images": len(samples), "seconds": round(generated, 1)})
    names = [f"synthetic-{config.seed}-{i:07d}" for i in range(len(samples))]
    splits = split_indices(names, config.val_fraction, config.test_fraction)

    def xy(idx: list[int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        x = np.stack([samples[i].array for i in idx]).astype(np.float32)
        labels = [samples[i].label for i in idx]
        return x, encode_labels(labels, alphabet, config.length[1]), labels

    x_train, y_train, _ = xy(splits["train"])
    x_val, y_val, labels_val = xy(splits["val"])
    samples.clear()

    def log(metrics: dict[str, float], epoch: int) -> None:
        note({"epoch": epoch + 1, "elapsed": round(time.monotonic() - start, 1)} | metrics)

    fitted = fit(
        config,
        arch,
        alphabet,
        (x_train, y_train),
        Validation(x_val, y_val, labels_val, alphabet),
        augment=False,
        deadline=start + config.max_minutes * 60,
        report=lambda stage, fraction, metrics: None,
        log=log,
    )
    trained = time.monotonic() - start
    result: dict = {
        "gpu": _gpu(),
        "backend": keras.backend.backend(),
        "train_images": len(x_train),
        "generate_seconds": round(generated, 1),
        "train_wall_seconds": round(trained, 1),
        "ema_val": fitted.averaged,
        "parameters": fitted.infer.count_params(),
    } | fitted.summary()
    for size in test_sizes:
        fresh = synthetic.generate(
            size,
            10_000 + size,
            alphabet=alphabet,
            length=config.length,
            workers=config.workers,
            preprocess_to=(arch.height, arch.width),
        )
        probs = fitted.infer.predict(np.stack([s.array for s in fresh]), batch_size=512, verbose=0)
        pred = [t for t, _ in decode_greedy(probs, alphabet)]
        true = [s.label for s in fresh]
        result[f"fresh_{size}_seq_acc"] = sequence_accuracy(pred, true)
        result[f"fresh_{size}_cer"] = character_error_rate(pred, true)
    note({"stage": "result"} | result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="generation + training budget")
    parser.add_argument("--images", type=int, default=400_000)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--any-device", action="store_true", help="smoke-test on a CPU too")
    args = parser.parse_args(argv if argv is not None else [])
    gpu = _gpu() or ("cpu" if args.any_device else None)
    if gpu is None:
        print("skipped: needs Keras on JAX with a GPU (see the module docstring)")
        return
    sizes = (2_000, 10_000) if gpu != "cpu" else (2_000, 500)
    result = run(args.minutes, args.images, args.out, sizes)
    acc = result["fresh_2000_seq_acc"]
    print(
        f"{gpu}: {acc:.2%} of 2,000 fresh CAPTCHAs "
        f"({result[f'fresh_{sizes[1]}_seq_acc']:.2%} of {sizes[1]:,})"
        f" after {result['train_wall_seconds'] / 60:.1f} min  (target >= 99.6% in <= 10 min)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
