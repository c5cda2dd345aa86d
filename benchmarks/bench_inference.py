"""Inference benchmark: the served pyfunc (ONNX Runtime) against the same network run by TensorFlow.

Usage:
  python -m benchmarks inference                     # via `make bench`
  python -m benchmarks.bench_inference [--weights PATH.keras] [--calls N]

Builds the demo-architecture network (or loads a trained .keras file), exports it to ONNX
exactly as training does, and measures in one invocation, each side in a fresh process:
single-image latency (bytes in, text out: preprocessing + network + CTC decoding), batch
throughput (64 images per call) and the process's resident memory after the work.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import record

TARGET_P50_MS = 0.5
TARGET_BATCH = 4000.0
TARGET_RSS_MB = 150.0

_WORKER = r"""
import json, os, sys, time
import numpy as np
from harness.processes import rss_mb
side, model_dir, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
from captchaops.data.synthetic import generate
images = [s.image for s in generate(64, 5)]
meta = json.loads(open(f"{model_dir}/meta.json").read())
if side == "onnxruntime":
    from pathlib import Path
    from captchaops.model.reader import OnnxReader  # all a model server holds of a version
    model = OnnxReader(Path(model_dir) / "crnn.onnx", meta)
    read = model.predict_images
    two = OnnxReader(Path(model_dir) / "crnn.onnx", meta, threads=2).predict_images
else:
    import keras, tensorflow as tf
    from captchaops.model.ctc import decode_greedy
    from captchaops.model.preprocess import preprocess
    net = keras.models.load_model(f"{model_dir}/crnn.keras")
    forward = tf.function(lambda x: net(x, training=False), reduce_retracing=True)
    def read(batch):
        x = np.stack([preprocess(b, meta["height"], meta["width"]) for b in batch])
        probs = forward(tf.constant(x)).numpy()
        return [{"text": t, "confidence": c} for t, c in decode_greedy(probs, meta["alphabet"])]
for _ in range(20):
    read(images[:1]); read(images)
single = []
for i in range(calls):
    t = time.perf_counter(); read([images[i % 64]]); single.append(time.perf_counter() - t)
t = time.perf_counter()
rounds = max(5, calls // 20)
for _ in range(rounds):
    read(images)
batch_s = time.perf_counter() - t
both = {}
if side == "onnxruntime":
    for _ in range(5):
        two(images)
    t = time.perf_counter()
    for _ in range(rounds):
        two(images)
    both = {"batch64_2threads_images_per_s": rounds * 64 / (time.perf_counter() - t)}
print(json.dumps(both | {
    "p50_ms": float(np.percentile(single, 50) * 1000),
    "p99_ms": float(np.percentile(single, 99) * 1000),
    "batch64_images_per_s": rounds * 64 / batch_s,
    "rss_mb": rss_mb(os.getpid(), children=False),
    "texts": [r["text"] for r in read(images[:8])],
}))
"""


def export(model_dir: Path, weights: Path | None) -> None:
    """Write crnn.keras, crnn.onnx and meta.json for the demo architecture into model_dir."""
    import keras
    import numpy as np

    from captchaops.data.synthetic import DIGITS_UPPER
    from captchaops.model.crnn import Architecture, build_crnn
    from captchaops.model.onnx_export import export_onnx

    arch = Architecture()
    if weights is not None:
        net = keras.models.load_model(weights)
        arch = Architecture(height=net.input_shape[1], width=net.input_shape[2])
    else:
        _, net = build_crnn(arch, len(DIGITS_UPPER) + 1)
    sample = np.random.default_rng(0).random((4, arch.height, arch.width, 1), dtype=np.float32)
    how = export_onnx(net, model_dir / "crnn.onnx", sample)
    net.export(str(model_dir / "crnn.unrolled.onnx"), format="onnx", verbose=False)
    net.save(model_dir / "crnn.keras")
    print(f"ONNX export: {how} (Keras' own unrolled export timed below as a variant)")
    meta = {"alphabet": DIGITS_UPPER, "height": arch.height, "width": arch.width}
    (model_dir / "meta.json").write_text(json.dumps(meta | {"model_format": "onnx"}))


def measure(side: str, model_dir: Path, calls: int) -> dict[str, float]:
    """Run one side in a fresh process and return its numbers."""
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, side, str(model_dir), str(calls)],
        capture_output=True, text=True, timeout=900, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def ort_variants(model_dir: Path, calls: int) -> list[dict[str, object]]:
    """Graph-optimisation levels and a dynamic int8 twin, timed side by side in this process."""
    import time

    import numpy as np
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = model_dir / "crnn.onnx"
    int8 = model_dir / "crnn.int8.onnx"
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    meta = json.loads((model_dir / "meta.json").read_text())
    rng = np.random.default_rng(0)
    one = rng.random((1, meta["height"], meta["width"], 1), dtype=np.float32)
    batch = rng.random((64, meta["height"], meta["width"], 1), dtype=np.float32)
    levels = ort.GraphOptimizationLevel
    rows: list[dict[str, object]] = []
    reference = None
    for name, path, level in (
        ("fp32 all, unrolled GRU", model_dir / "crnn.unrolled.onnx", levels.ORT_ENABLE_ALL),
        ("fp32 basic", fp32, levels.ORT_ENABLE_BASIC),
        ("fp32 extended", fp32, levels.ORT_ENABLE_EXTENDED),
        ("fp32 all (ours)", fp32, levels.ORT_ENABLE_ALL),
        ("int8 dynamic, all", int8, levels.ORT_ENABLE_ALL),
    ):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = session.get_inputs()[0].name
        for _ in range(20):
            session.run(None, {feed: one})
        single = []
        for _ in range(calls):
            began = time.perf_counter()
            session.run(None, {feed: one})
            single.append(time.perf_counter() - began)
        began = time.perf_counter()
        for _ in range(10):
            probs = session.run(None, {feed: batch})[0]
        best = probs.argmax(axis=2)
        reference = best if reference is None else reference
        rows.append(
            {
                "variant": name,
                "p50_ms": float(np.percentile(single, 50) * 1000),
                "batch64_images_per_s": 640 / (time.perf_counter() - began),
                "same_best_path": float((best == reference).mean()),
                "bytes": path.stat().st_size,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    """Measure both sides, print them with targets and ratios, save bench-results/inference.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None, help="a trained crnn.keras")
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args(argv if argv is not None else [])
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        export(model_dir, args.weights)
        ort = measure("onnxruntime", model_dir, args.calls)
        tf = measure("tensorflow", model_dir, args.calls)
        variants = ort_variants(model_dir, args.calls)
    same = ort.pop("texts") == tf.pop("texts")
    two_threads = ort.pop("batch64_2threads_images_per_s")
    print(f"{'':24}{'onnxruntime':>14}{'tensorflow':>14}{'ratio':>8}   target")
    rows = [
        ("single image p50 (ms)", "p50_ms", f"<= {TARGET_P50_MS}"),
        ("single image p99 (ms)", "p99_ms", ""),
        ("batch of 64 (img/s)", "batch64_images_per_s", f">= {TARGET_BATCH:.0f}"),
        ("process RSS (MB)", "rss_mb", f"<= {TARGET_RSS_MB:.0f}"),
    ]
    for label, key, target in rows:
        ratio = tf[key] / ort[key] if key != "batch64_images_per_s" else ort[key] / tf[key]
        print(f"{label:24}{ort[key]:14.2f}{tf[key]:14.2f}{ratio:7.1f}x   {target}")
    print(f"batch of 64, same process with threads=2: {two_threads:.0f} img/s")
    print(f"same texts from both runtimes: {same}")
    batch = max(ort["batch64_images_per_s"], two_threads)
    print(
        f"targets: p50 {'met' if ort['p50_ms'] <= TARGET_P50_MS else 'missed'}, "
        f"batch {'met' if batch >= TARGET_BATCH else 'missed'} ({batch:.0f} img/s), "
        f"RSS {'met' if ort['rss_mb'] <= TARGET_RSS_MB else 'missed'}"
    )
    base = next(v for v in variants if v["variant"] == "fp32 all (ours)")
    print(
        f"\n{'ONNX Runtime variant':24}{'p50 ms':>10}{'img/s @64':>11}{'vs ours':>9}{'same path':>11}"
    )
    for v in variants:
        speed = float(v["batch64_images_per_s"]) / float(base["batch64_images_per_s"])
        print(
            f"{v['variant']:24}{v['p50_ms']:10.3f}{v['batch64_images_per_s']:11.0f}"
            f"{speed:8.2f}x{v['same_best_path']:11.4f}"
        )
    print("an int8 twin is kept only if faster and within 0.1 point on the frozen set")
    record.save(
        "inference",
        {
            "onnxruntime": ort | {"batch64_2threads_images_per_s": two_threads},
            "tensorflow": tf,
            "same_texts": same,
            "variants": variants,
        },
    )


if __name__ == "__main__":
    main(sys.argv[1:])
