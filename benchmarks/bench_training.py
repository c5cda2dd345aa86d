"""Training benchmarks: the 5-minute demo budget and the long synthetic-accuracy run.

Usage:
  python -m benchmarks training                           # via `make bench`: the demo budget
  python -m benchmarks.bench_training --mode demo         # same
  python -m benchmarks.bench_training --mode accuracy [--minutes 60]

Runs `captchaops.training.run.train` in this process against a private tracking server, data
generation included in the wall time, then reads 2,000 fresh held-out CAPTCHAs (a seed the
training never saw) through the registered pyfunc (ONNX Runtime, the served path).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

VENV_BIN = Path(sys.executable).parent
RESULTS = Path("bench-results") / "training.json"
TARGETS = {"demo": (0.95, 5.0), "accuracy": (0.996, 60.0)}  # (sequence accuracy, minutes)
HELD_OUT_SEED = 1_000_003


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tracking_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (home / "mlflow.log").open("wb")
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
            "--artifacts-destination", str(home / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                return proc, uri
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the private tracking server did not start")


def held_out_accuracy(model_uri: str, tracking_uri: str, n: int) -> float:
    """Sequence accuracy of a registered model on `n` fresh CAPTCHAs, read through its pyfunc."""
    import mlflow

    from captchaops.data.synthetic import generate
    from captchaops.evaluation.accuracy import sequence_accuracy

    samples = generate(n, HELD_OUT_SEED, workers=2)
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model().reader
    pred = [
        row["text"]
        for start in range(0, n, 256)
        for row in model.predict_images([s.image for s in samples[start : start + 256]])
    ]
    return sequence_accuracy(pred, [s.label for s in samples])


def _print_epochs(started: float):  # type: ignore[no-untyped-def]
    """A progress callback that prints each finished epoch's validation metrics once."""
    seen: set[str] = set()

    def report(stage: str, fraction: float, metrics: dict[str, float]) -> None:
        key = f"{stage}:{metrics.get('val_seq_acc')}"
        if "val_seq_acc" in metrics and key not in seen:
            seen.add(key)
            print(
                f"{time.monotonic() - started:6.0f}s {stage}: val_seq_acc {metrics['val_seq_acc']:.4f}"
                f" val_cer {metrics['val_cer']:.4f} loss {metrics['loss']:.3f}",
                flush=True,
            )

    return report


def run(
    mode: str, minutes: float | None, held_out: int, synthetic: int | None, epochs: int | None
) -> dict[str, object]:
    """Train with the preset for `mode`, then measure held-out accuracy; return the numbers."""
    from captchaops.settings import load_settings
    from captchaops.training.run import TrainConfig, train, with_overrides

    config = TrainConfig.demo() if mode == "demo" else TrainConfig.accuracy()
    config = with_overrides(config, max_minutes=minutes, synthetic=synthetic, epochs=epochs)
    with tempfile.TemporaryDirectory() as tmp:
        proc, uri = _tracking_server(Path(tmp))
        try:
            settings = load_settings(home=Path(tmp) / "home", tracking_uri=uri, staging_floor=0.0)
            started = time.monotonic()
            result = train(config, settings, progress=_print_epochs(started))
            wall = time.monotonic() - started
            print(f"trained in {wall:.0f}s: {result.metrics}", flush=True)
            accuracy = held_out_accuracy(result.model_uri, uri, held_out)
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    since_process_start = time.time() - psutil.Process().create_time()
    return {
        "mode": mode,
        "config": {k: str(v) for k, v in config.params().items()},
        "train_wall_s": wall,
        "process_wall_s": since_process_start,
        "fit_s": result.metrics["fit_seconds"],
        "epochs_run": result.metrics["epochs_run"],
        "test_seq_acc": result.metrics["test_seq_acc"],
        "held_out_n": held_out,
        "held_out_seq_acc": accuracy,
        "cpu_count": psutil.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
    }


def report(numbers: dict[str, object]) -> None:
    """Print measured numbers beside their targets."""
    target_acc, target_min = TARGETS[str(numbers["mode"])]
    acc = float(numbers["held_out_seq_acc"])  # type: ignore[arg-type]
    wall_min = float(numbers["train_wall_s"]) / 60  # type: ignore[arg-type]
    print(
        f"mode {numbers['mode']}: {numbers['cpu_count']} CPUs, load average {numbers['load_avg_1m']:.1f}"
    )
    print(
        f"held-out sequence accuracy {acc:.4f} on {numbers['held_out_n']} fresh images "
        f"(target >= {target_acc}; ratio {acc / target_acc:.3f}; "
        f"gap {max(0.0, target_acc - acc) * 100:.2f} points)"
    )
    print(
        f"wall time {wall_min:.2f} min including data generation "
        f"(target <= {target_min} min; ratio {wall_min / target_min:.2f}); "
        f"process total {float(numbers['process_wall_s']) / 60:.2f} min"  # type: ignore[arg-type]
    )
    print(
        f"fit {float(numbers['fit_s']):.0f}s over {numbers['epochs_run']:.0f} epochs; "  # type: ignore[arg-type]
        f"in-run test split accuracy {float(numbers['test_seq_acc']):.4f}"  # type: ignore[arg-type]
    )


def main(argv: list[str] | None = None) -> None:
    """Run one training benchmark, print it and save bench-results/training.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(TARGETS), default="demo")
    parser.add_argument("--minutes", type=float, default=None, help="override the time budget")
    parser.add_argument("--synthetic", type=int, default=None, help="override the data size")
    parser.add_argument("--epochs", type=int, default=None, help="override the epochs")
    parser.add_argument("--held-out", type=int, default=2000)
    args = parser.parse_args(argv if argv is not None else [])
    numbers = run(args.mode, args.minutes, args.held_out, args.synthetic, args.epochs)
    report(numbers)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
