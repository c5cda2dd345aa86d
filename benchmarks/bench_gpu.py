"""One GPU, at most 10 minutes: held-out accuracy of the GPU preset on fresh CAPTCHAs.

Target (issue 23): >= 99.6% sequence accuracy on 2,000 fresh 4-character CAPTCHAs after at
most 10 minutes of training on one H100/H200-class GPU. Runs the project's own training loop
(`captchaops.training.loop.fit`, the loop `captchaops train` runs inside its MLflow run) with
Keras on JAX, so it needs neither MLflow nor TensorFlow on the GPU machine:

    KERAS_BACKEND=jax python -m benchmarks.bench_gpu [--minutes 8] [--workers N] [--out DIR]

Training images are drawn fresh while the GPU trains (`captchaops.training.fresh`: one worker
process per spare CPU core, each image used `reuse` times on average), in mixed bfloat16
precision unless `--precision float32`. Before training it times 30 steps on one batch held
in memory (the device's own speed) and prints, after training, whether the steps were
bound by the host (the data stream or the loop) or by the device. Elsewhere (no JAX GPU) it
prints that it was skipped. The test images are the Keras network's reads of fresh seeds;
the ONNX export needs TensorFlow and is not part of this measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
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


def device_step_seconds(train_model, batch: tuple) -> float:  # type: ignore[no-untyped-def]
    """Seconds per step on one batch held in memory: the device's speed without the stream."""
    import numpy as np

    x = np.repeat(batch[0], 30, axis=0)
    y = np.repeat(batch[1], 30, axis=0)
    size = len(batch[0])
    train_model.fit(x[:size], y[:size], batch_size=size, epochs=1, verbose=0)  # trace
    began = time.monotonic()
    train_model.fit(x, y, batch_size=size, epochs=1, verbose=0, shuffle=False)
    return (time.monotonic() - began) / 30


def run(
    minutes: float,
    pool: int,
    workers: int,
    precision: str,
    out: Path | None,
    test_sizes: tuple[int, ...],
    **overrides: float | None,
) -> dict:
    import math

    import keras
    import numpy as np

    from captchaops.data import synthetic
    from captchaops.evaluation.accuracy import character_error_rate, sequence_accuracy
    from captchaops.model.crnn import build_crnn, ctc_loss
    from captchaops.model.ctc import decode_greedy
    from captchaops.training.config import TrainConfig, with_overrides
    from captchaops.training.fresh import fresh_data
    from captchaops.training.loop import fit

    start = time.monotonic()
    keras.config.set_dtype_policy(precision)
    config = with_overrides(
        TrainConfig.gpu(), max_minutes=minutes, synthetic=pool, workers=workers, **overrides
    )
    arch, alphabet = config.arch, synthetic.DIGITS_UPPER
    keras.utils.set_random_seed(config.seed)
    log_path = out / "epochs.jsonl" if out else None

    def note(record: dict) -> None:
        print(json.dumps(record), flush=True)
        if log_path:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def log(metrics: dict[str, float], epoch: int) -> None:
        note({"epoch": epoch + 1, "elapsed": round(time.monotonic() - start, 1)} | metrics)

    with fresh_data(config, arch, alphabet) as fresh:
        note({"stage": "validation set ready", "seconds": round(time.monotonic() - start, 1)})
        stream = fresh.stream(math.ceil(fresh.capacity / config.batch_size))
        probe, _ = build_crnn(arch, len(alphabet) + 1)
        probe.compile(optimizer=keras.optimizers.AdamW(1e-4), loss=ctc_loss)
        val = fresh.validation()
        device_s = device_step_seconds(probe, (val.x[:256], val.y[:256]))
        note({"stage": "device step", "ms": round(device_s * 1000, 2)})
        fitted = fit(
            config,
            arch,
            alphabet,
            stream,
            val,
            augment=False,
            deadline=start + config.max_minutes * 60,
            report=lambda stage, fraction, metrics: None,
            log=log,
        )
        waited = fresh.images.waited
    trained = time.monotonic() - start
    step_s = fitted.fit_seconds / max(fitted.steps, 1)
    result: dict = {
        "gpu": _gpu(),
        "backend": keras.backend.backend(),
        "precision": precision,
        "workers": workers,
        "reuse": config.reuse,
        "steps_per_execution": config.steps_per_execution,
        "draw_niceness": config.draw_niceness,
        "train_wall_seconds": round(trained, 1),
        "seconds_to_first_step": round(fitted.first_step_at - start, 1),
        "device_step_ms": round(device_s * 1000, 2),
        "fit_step_ms": round(step_s * 1000, 2),
        "stream_wait_seconds": round(waited, 1),
        "ema_val": fitted.averaged,
        "parameters": fitted.infer.count_params(),
    } | fitted.summary()
    result["host_bound"] = step_s > 1.25 * device_s
    for size in test_sizes:
        fresh_set = synthetic.generate(
            size,
            10_000 + size,
            alphabet=alphabet,
            length=config.length,
            workers=workers,
            preprocess_to=(arch.height, arch.width),
        )
        x = np.stack([s.array for s in fresh_set])
        probs = fitted.infer.predict(x, batch_size=512, verbose=0)
        pred = [t for t, _ in decode_greedy(np.asarray(probs, dtype=np.float32), alphabet)]
        true = [s.label for s in fresh_set]
        result[f"fresh_{size}_seq_acc"] = sequence_accuracy(pred, true)
        result[f"fresh_{size}_cer"] = character_error_rate(pred, true)
    note({"stage": "result"} | result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="generation + training budget")
    parser.add_argument(
        "--pool", type=int, default=400_000, help="--synthetic: pool and held-out sets"
    )
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument(
        "--precision", default="mixed_bfloat16", choices=("mixed_bfloat16", "float32")
    )
    parser.add_argument("--reuse", type=float, default=None, help="default: the GPU preset's")
    parser.add_argument(
        "--steps-per-execution", type=int, default=None, help="default: the GPU preset's"
    )
    parser.add_argument(
        "--draw-niceness", type=int, default=None, help="the drawing workers' nice increment"
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--any-device", action="store_true", help="smoke-test on a CPU too")
    args = parser.parse_args(argv if argv is not None else [])
    gpu = _gpu() or ("cpu" if args.any_device else None)
    if gpu is None:
        print("skipped: needs Keras on JAX with a GPU (see the module docstring)")
        return
    sizes = (2_000, 10_000) if gpu != "cpu" else (2_000, 500)
    precision = args.precision if gpu != "cpu" else "float32"
    result = run(
        args.minutes,
        args.pool,
        args.workers,
        precision,
        args.out,
        sizes,
        reuse=args.reuse,  # None: the GPU preset's (`with_overrides` skips them)
        steps_per_execution=args.steps_per_execution,
        draw_niceness=args.draw_niceness,
    )
    acc = result["fresh_2000_seq_acc"]
    print(
        f"{gpu}: {acc:.2%} of 2,000 fresh CAPTCHAs "
        f"({result[f'fresh_{sizes[1]}_seq_acc']:.2%} of {sizes[1]:,})"
        f" after {result['train_wall_seconds'] / 60:.1f} min  (target >= 99.6% in <= 10 min)"
    )
    print(
        f"steps {result['steps_run']:,.0f} of {result['steps_planned']:,.0f} planned, "
        f"{result['fit_step_ms']:.1f} ms per step in training vs {result['device_step_ms']:.1f} ms "
        f"on one batch in memory: "
        + ("HOST-BOUND (data stream or loop)" if result["host_bound"] else "device-bound")
        + f"; waited {result['stream_wait_seconds']:.0f}s for fresh shards, "
        f"{result['fresh_images']:,.0f} fresh images, {result['images_per_second']:,.0f} images/s, "
        f"first step after {result['seconds_to_first_step']:.0f}s; reuse {result['reuse']:g}, "
        f"{result['steps_per_execution']} steps a call"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
