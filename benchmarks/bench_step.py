"""Time one demo-preset training step, built the way the importable captchaops builds it.

A probe for A/B runs across commits (issue 23): it builds the demo preset's network,
optimiser and per-step callbacks with whichever `captchaops` is on the path (this tree, or
an older worktree's `src` put first with PYTHONPATH), fits fixed arrays (no generator, no
worker processes) and prints the median and mean step time after a warm-up. Run it
alternately against two trees in the same minutes; a shared machine's load moves too much for
runs an hour apart to compare:

    python -m benchmarks.bench_step                       # this tree, as `train` builds it
    PYTHONPATH=/work/wt/old17/src python -m benchmarks.bench_step   # an older tree

`--variant` isolates one part of the set-up (only on trees with `compiled_crnn`):
`const-lr` compiles the same optimiser with a constant learning rate instead of the
step-counted schedule; `bare` fits without the loop's callbacks; `xla` compiles the
training step with XLA (`jit_compile=True`); `rolled` builds the GRU with `unroll=False`. TensorFlow's own thread pools follow
TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS in the environment.

`--roofline` sets the step time beside what its arithmetic costs on this machine (issue 40: a
step within 2x the time its FLOPs take at the machine's measured matmul rate): the demo
network's multiply-adds are counted from its layers (convolutions, dense layers and both GRU
directions over every time step; batch norm, activations, pooling and the CTC loss are not
counted), a training step is taken as 3x the forward pass (the backward pass computes two
products per forward one), and the rate is TensorFlow's own float32 matmul of 1024x1024
matrices on this process's thread pools, the best of 20. The result is recorded
(`bench-results/step-roofline-*.json`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path("/tmp/captchaops_bench_step.npz")
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _data(n: int, arch: Any, alphabet: str) -> tuple[np.ndarray, np.ndarray]:
    """`n` demo-preset CAPTCHAs as network input, cached so every probe fits the same arrays."""
    if DATA.exists():
        cached = np.load(DATA)
        if len(cached["x"]) >= n and cached["x"].shape[1:3] == (arch.height, arch.width):
            return cached["x"][:n], cached["y"][:n]
    from captchaops.data.synthetic import generate
    from captchaops.model.ctc import encode_labels

    samples = generate(n, 7, preprocess_to=(arch.height, arch.width), workers=1)
    x = np.stack([s.array for s in samples]).astype(np.float32)  # type: ignore[misc]
    if x.ndim == 3:
        x = x[..., None]
    y = encode_labels([s.label for s in samples], alphabet, 4)
    np.savez(DATA, x=x, y=y, labels=np.array([s.label for s in samples]))
    return x, y


class Timer:
    """Wall time at the end of every step (a Keras callback, built lazily to import Keras late)."""

    def __new__(cls) -> Any:
        import keras

        class _Timer(keras.callbacks.Callback):
            def __init__(self) -> None:
                super().__init__()
                self.ends: list[float] = []
                self.cpu: list[float] = []  # this process's CPU seconds (all its threads)

            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                self.ends.append(time.perf_counter())
                self.cpu.append(time.process_time())

        return _Timer()


def build(variant: str, steps: int, val: Any) -> tuple[Any, list[Any], str]:
    """(training model, the loop's callbacks, how it was built) for the importable tree."""
    import keras

    from captchaops.model.crnn import build_crnn, ctc_loss
    from captchaops.training import loop
    from captchaops.training.config import TrainConfig

    config = TrainConfig.demo()
    arch, alphabet = config.arch, ALPHABET
    if variant == "rolled":  # the same GRU as a loop instead of unrolled over the time steps
        gru = keras.layers.GRU
        keras.layers.GRU = lambda *a, **k: gru(*a, **(k | {"unroll": False}))
    deadline = time.monotonic() + 3600
    noop = lambda *args: None  # noqa: E731
    if hasattr(loop, "compiled_crnn"):
        model, infer, plan = loop.compiled_crnn(
            config, arch, len(alphabet) + 1, augment=False, total_steps=steps, deadline=deadline
        )
        how = "compiled_crnn (WarmupCosine in the optimiser, StepPlan)"
        if variant == "const-lr":
            model, infer = build_crnn(arch, len(alphabet) + 1, augment=False)
            model.compile(
                optimizer=keras.optimizers.AdamW(
                    config.learning_rate,
                    weight_decay=config.weight_decay,
                    clipnorm=config.clipnorm,
                ),
                loss=ctc_loss,
            )
            how = "build_crnn + AdamW(constant lr), StepPlan"
        monitor = loop.Monitor(infer, val, plan, noop, noop, min_steps=10**9, patience=10**9)
        callbacks = [plan, monitor]
    else:
        model, infer = build_crnn(arch, len(alphabet) + 1, augment=False)
        model.compile(
            optimizer=keras.optimizers.AdamW(
                config.learning_rate, weight_decay=config.weight_decay, clipnorm=config.clipnorm
            ),
            loss=ctc_loss,
        )
        schedule = loop.Schedule(  # type: ignore[attr-defined]
            config, steps, deadline
        )
        monitor = loop.Monitor(infer, val, schedule, noop, noop, min_steps=10**9, patience=10**9)
        callbacks = [schedule, monitor]
        how = "build_crnn + AdamW(lr), Schedule callback assigning the lr each step"
    if variant == "rolled":
        how += ", GRU unroll=False"
    if variant == "xla":
        model.jit_compile, how = True, how + ", jit_compile=True (XLA)"
    if variant == "bare":
        callbacks, how = [], how + ", no loop callbacks"
    return model, callbacks, how


def draw(n: int) -> dict[str, Any]:
    """Milliseconds per CAPTCHA drawn and preprocessed by the tree's generator on one process."""
    import captchaops
    from captchaops.data.synthetic import generate

    wall, cpu = time.perf_counter(), time.process_time()
    generate(n, 11, preprocess_to=(32, 80), workers=1)
    return {
        "src": str(Path(captchaops.__file__).parent),
        "mode": f"draw {n}",
        "ms_per_image": round((time.perf_counter() - wall) * 1000 / n, 3),
        "cpu_ms_per_image": round((time.process_time() - cpu) * 1000 / n, 3),
        "load": Path("/proc/loadavg").read_text().split()[0],
    }


def _cpu_per_step(timer: Any, warmup: int) -> float:
    """CPU milliseconds the process spent per step after the warm-up: less moved by the load of
    other processes than wall time, so it separates a costlier step from a busier machine."""
    cpu = timer.cpu[warmup - 1 :]
    return round((cpu[-1] - cpu[0]) * 1000 / max(len(cpu) - 1, 1), 2)


def whole_loop(seconds: float, warmup: int) -> dict[str, Any]:
    """The tree's `loop.fit` on fixed arrays for `seconds`, every step's end timed."""
    import keras

    import captchaops
    from captchaops.training import loop
    from captchaops.training.config import TrainConfig

    config = TrainConfig.demo()
    x, y = _data(4096, config.arch, ALPHABET)
    labels = [str(label) for label in np.load(DATA)["labels"][:4096]]
    train = (np.concatenate([x] * 6)[:24_000], np.concatenate([y] * 6)[:24_000])
    val = loop.Validation(x[:3000], y[:3000], labels[:3000], ALPHABET)
    timer = Timer()
    plain_fit = keras.Model.fit

    def timed_fit(self: Any, *args: Any, callbacks: Any = None, **kwargs: Any) -> Any:
        return plain_fit(self, *args, callbacks=[*(callbacks or []), timer], **kwargs)

    keras.Model.fit = timed_fit  # type: ignore[method-assign]
    started = time.perf_counter()
    noop = lambda *args: None  # noqa: E731
    fitted = loop.fit(
        config,
        config.arch,
        ALPHABET,
        train,
        val,
        augment=False,
        deadline=time.monotonic() + seconds,
        report=noop,
        log=noop,
    )
    ends = timer.ends
    gaps = np.diff(ends[warmup - 1 :]) * 1000
    return {
        "src": str(Path(captchaops.__file__).parent),
        "mode": f"loop.fit for {seconds:.0f} s",
        "first_step_s": round(ends[0] - started, 2),
        "steps": len(ends),
        "epochs": len(fitted.history),
        "step_ms_median": round(statistics.median(gaps), 2),
        "cpu_ms_per_step": _cpu_per_step(timer, warmup),
        "step_ms_mean_validation_included": round(
            (ends[-1] - ends[warmup - 1]) * 1000 / len(gaps), 2
        ),
        "load": Path("/proc/loadavg").read_text().split()[0],
    }


def forward_flops(model: Any) -> dict[str, int]:
    """Floating-point operations (2 per multiply-add) of one image's forward pass, by layer kind."""
    import keras

    counts = {"conv": 0, "dense": 0, "gru": 0}
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, filters = layer.output.shape
            kh, kw, channels, _ = layer.kernel.shape
            counts["conv"] += 2 * height * width * kh * kw * channels * filters
        elif isinstance(layer, keras.layers.Dense):
            steps = int(np.prod(layer.output.shape[1:-1])) or 1
            fan_in, fan_out = layer.kernel.shape
            counts["dense"] += 2 * steps * fan_in * fan_out
        elif isinstance(layer, keras.layers.Bidirectional):
            _, steps, fan_in = layer.input.shape
            units = layer.forward_layer.units
            gates = 3  # GRU: update, reset, candidate
            counts["gru"] += 2 * 2 * steps * gates * (fan_in * units + units * units)
    return counts


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    """TensorFlow's float32 matmul rate on this process's thread pools, GFLOP/s, best of `repeats`."""
    import tensorflow as tf

    a = tf.random.uniform((size, size))
    b = tf.random.uniform((size, size))
    tf.linalg.matmul(a, b).numpy()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        tf.linalg.matmul(a, b).numpy()
        best = min(best, time.perf_counter() - began)
    return 2 * size**3 / best / 1e9


def roofline(timed: dict[str, Any], model: Any, batch: int) -> dict[str, Any]:
    """The step's FLOPs, the machine's matmul rate and the ratio of the measured step to the
    time those FLOPs take at that rate."""
    forward = forward_flops(model)
    step_flops = 3 * batch * sum(forward.values())
    rate = matmul_gflops()
    ideal_ms = step_flops / (rate * 1e9) * 1000
    return {
        "forward_mflops_per_image": {k: round(v / 1e6, 2) for k, v in forward.items()},
        "step_gflops": round(step_flops / 1e9, 3),
        "matmul_gflops_per_s": round(rate, 1),
        "ideal_step_ms": round(ideal_ms, 2),
        "measured_over_ideal": round(timed["step_ms_median"] / ideal_ms, 2),
    }


def main(argv: list[str] | None = None) -> None:
    """Print one JSON line: the tree, how it built the step, and its step times."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument(
        "--variant", choices=["as-is", "const-lr", "bare", "xla", "rolled"], default="as-is"
    )
    parser.add_argument(
        "--loop-seconds",
        type=float,
        default=0.0,
        help="instead: run the tree's own `loop.fit` on 24,000 fixed images (750 steps an "
        "epoch, 3,000 validated at its end, as the demo preset) for this many seconds",
    )
    parser.add_argument(
        "--draw",
        type=int,
        default=0,
        help="instead: time drawing and preprocessing this many CAPTCHAs on one process (pure "
        "Python and Pillow, no TensorFlow: how fast this machine is, whichever tree)",
    )
    parser.add_argument(
        "--roofline",
        action="store_true",
        help="also count the step's FLOPs, measure this machine's matmul rate, print the "
        "ratio and record it",
    )
    args = parser.parse_args(argv if argv is not None else [])
    if args.draw:
        print(json.dumps(draw(args.draw)))
        return
    if args.loop_seconds:
        print(json.dumps(whole_loop(args.loop_seconds, args.warmup)))
        return
    import keras

    import captchaops
    from captchaops.training.config import TrainConfig
    from captchaops.training.loop import Validation

    total, batch = args.steps + args.warmup, TrainConfig.demo().batch_size
    x, y = _data(min(total * batch, 4096), TrainConfig.demo().arch, ALPHABET)
    labels = [str(label) for label in np.load(DATA)["labels"][:64]]
    model, callbacks, how = build(args.variant, total, Validation(x[:64], y[:64], labels, ALPHABET))
    reps = -(-total * batch // len(x))
    x, y = np.concatenate([x] * reps)[: total * batch], np.concatenate([y] * reps)[: total * batch]
    timer = Timer()
    started = time.perf_counter()
    model.fit(
        x, y, batch_size=batch, epochs=1, shuffle=False, callbacks=[*callbacks, timer], verbose=0
    )
    gaps = np.diff(timer.ends[args.warmup - 1 :]) * 1000
    result = {
        "src": str(Path(captchaops.__file__).parent),
        "variant": args.variant,
        "built": how,
        "keras": keras.__version__,
        "first_step_s": round(timer.ends[0] - started, 2),
        "steps_timed": len(gaps),
        "step_ms_median": round(statistics.median(gaps), 2),
        "step_ms_mean": round(float(np.mean(gaps)), 2),
        "cpu_ms_per_step": _cpu_per_step(timer, args.warmup),
        "load": Path("/proc/loadavg").read_text().split()[0],
    }
    if args.roofline:
        from benchmarks import record

        result |= roofline(result, model, batch)
        print(
            f"demo step: {result['step_ms_median']} ms measured (median), "
            f"{result['step_gflops']} GFLOP at {result['matmul_gflops_per_s']} GFLOP/s "
            f"(this machine's matmul) = {result['ideal_step_ms']} ms; measured / ideal "
            f"{result['measured_over_ideal']} (target <= 2)"
        )
        record.save(
            "step-roofline",
            result,
            {
                "demo step, median": f"{result['step_ms_median']} ms",
                "demo step at the measured matmul rate": f"{result['ideal_step_ms']} ms",
                "measured / ideal step time": f"{result['measured_over_ideal']}x",
            },
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
