"""Real-shaped folders: 5-fold cross-validated held-out accuracy of `captchaops train --data DIR`.

Usage:
  python -m benchmarks folder                         # via `make bench`: 5 folds of 1,040
  python -m benchmarks.bench_folder --folds 5 --count 1040 [--folder DIR]

The data is the stand-in for a real folder (`captchaops.data.standin`: 200x50, 5 characters
of 2345678bcdefgmnpwxy, another renderer than the synthetic generator), or a real folder with
--folder. For fold k the scheme's frozen evaluation set is made from fold k's images first
(`captchaops evalset --folder FOLD --size 0`), then the folder preset trains on the whole
folder: training leaves out the frozen images by content hash, so fold k is never seen, and
the reported accuracy is the registered ONNX model's on fold k. Side by side, in the same run,
the preset the CLI used for folders before (the 5-minute demo preset) on fold 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks import record

TARGET = 0.98
T_975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def _folds(folder: Path, k: int) -> list[list[Path]]:
    """The folder's files in `k` folds, each file's fold decided by hashing its name."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    out: list[list[Path]] = [[] for _ in range(k)]
    for path in files:
        digest = hashlib.sha256(f"fold/{path.name}".encode()).digest()
        out[int.from_bytes(digest[:8], "big") % k].append(path)
    return out


def run_fold(
    folder: Path,
    fold: list[Path],
    config_name: str,
    work: Path,
    tag: str,
    max_minutes: float | None = None,
) -> dict:
    """Freeze `fold` as the scheme's evaluation set, train on `folder`, return the fold's score."""
    from captchaops import mlflow_scope
    from captchaops.evaluation.evalset import create_evalset
    from captchaops.settings import load_settings
    from captchaops.training.run import TrainConfig, train

    held = work / f"heldout-{tag}"
    held.mkdir()
    for path in fold:
        shutil.copy(path, held / path.name)
    settings = load_settings(
        home=work / f"home-{tag}",
        tracking_uri=f"sqlite:///{work / f'mlflow-{tag}.db'}",
        model_name=f"folder-{tag}",
        staging_floor=0.0,
    )
    create_evalset(mlflow_scope.client(settings), settings, size=0, folder=held)
    base = TrainConfig.folder() if config_name == "folder" else TrainConfig.demo()
    config = replace(base, data_dir=folder, max_minutes=max_minutes or base.max_minutes)
    began = time.monotonic()
    result = train(config, settings)
    minutes = (time.monotonic() - began) / 60
    return {
        "fold": tag,
        "config": config_name,
        "heldout_images": len(fold),
        "heldout_seq_acc": result.metrics["test_seq_acc"],
        "heldout_cer": result.metrics["test_cer"],
        "steps": result.metrics["steps_run"],
        "best_epoch": result.metrics["best_epoch"],
        "kept_final_weights": result.metrics["kept_final_weights"],
        "minutes": minutes,
        "warning": result.warning,
    }


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and a 95% t-interval over the folds."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = T_975.get(len(values), 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def main(argv: list[str] | None = None) -> None:
    """Cross-validate the folder preset (and the old default on one fold) and print the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_folder")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--count", type=int, default=1040, help="stand-in images to build")
    parser.add_argument("--folder", type=Path, help="a real labelled folder instead")
    parser.add_argument("--no-baseline", action="store_true", help="skip the old preset's fold")
    parser.add_argument(
        "--only", type=int, nargs="*", help="run only these folds (no summary file)"
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        help="raise the time cap so a busy machine still runs every planned step (accuracy only)",
    )
    args = parser.parse_args(argv if argv is not None else [])
    from captchaops.data import standin

    home = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.chdir(work)  # a sqlite tracking URI keeps artifacts in ./mlruns: keep them in here
        folder = args.folder
        if folder is None:
            folder = work / "standin"
            standin.build(folder, args.count, seed=0)
        folds = _folds(folder, args.folds)
        rows = []
        if not args.no_baseline:
            rows.append(run_fold(folder, folds[0], "demo", work, "old-0"))
            print(json.dumps(rows[-1]), flush=True)
        for k, fold in enumerate(folds):
            if args.only is not None and k not in args.only:
                continue
            rows.append(run_fold(folder, fold, "folder", work, str(k), args.max_minutes))
            print(json.dumps(rows[-1]), flush=True)
        os.chdir(home)
    accs = [r["heldout_seq_acc"] for r in rows if r["config"] == "folder"]
    mean, low, high = interval(accs)
    worst = max(r["minutes"] for r in rows if r["config"] == "folder")
    print(f"\nfolder preset, {len(accs)}-fold held-out sequence accuracy on {folder.name}:")
    for r in rows:
        print(
            f"  fold {r['fold']:>6} ({r['config']:>6}): {r['heldout_seq_acc']:.4f} "
            f"(CER {r['heldout_cer']:.4f}, {r['heldout_images']} images) "
            f"in {r['minutes']:.1f} min, {r['steps']:.0f} steps"
        )
    print(f"  mean {mean:.4f}, 95% interval [{low:.4f}, {high:.4f}]; target >= {TARGET}")
    print(f"  slowest fold {worst:.1f} min; target <= 10 min on 2 cores")
    old = [r for r in rows if r["config"] == "demo"]
    if old:
        same = next(r for r in rows if r["config"] == "folder" and r["fold"] == "0")
        print(
            f"  side by side on fold 0: old default {old[0]['heldout_seq_acc']:.4f} vs "
            f"folder preset {same['heldout_seq_acc']:.4f}"
        )
    if args.only is not None:
        return
    record.save(
        "folder",
        {"rows": rows, "mean": mean, "interval": [low, high], "target": TARGET},
        {"folder preset, held-out accuracy over folds": f"{mean:.2%} ({len(accs)} folds)"},
    )


if __name__ == "__main__":
    main(sys.argv[1:])
