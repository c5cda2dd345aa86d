"""Which weights a folder run should keep: every candidate of one training run, side by side.

Usage:
  python -m benchmarks.bench_folder_choice --only 0 1 [--folds 5] [--count 1040] [--steps N]

For each fold k (the same folds as `bench_folder`), trains the folder preset once on the
other folds the way `captchaops train --data` does (same splits, same loop, no MLflow), then
scores four candidates on the held-out fold: the final (averaged) weights and the best
checkpoint, each with the BatchNorm statistics training left and with statistics recomputed
on the clean training images (`recalibrate_batchnorm` below:
measured here, not kept in the loop). The training noise is
the same for all four, so the comparison is paired. Also printed: which candidate the current
rule (`holds_up`) picks with and without recalibration, and, scored the same way with
recomputed statistics, longer weight averages of the same run: EMAs of momentum 0.995 and
0.998 from a quarter of the planned steps, and uniform averages over the last 1,500 and 800
steps (`emaM+bn`, `swaN+bn`). One JSON line per fold; `--steps N` plans fewer steps (a smoke
test).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any


class _Averages:
    """Longer weight averages of the live (trainable) weights, kept beside the optimiser's EMA:
    EMAs of other momenta from a quarter of the planned steps, and uniform averages over the last N steps."""

    def __init__(self, model, total: int):  # type: ignore[no-untyped-def]
        import keras

        class Callback(keras.callbacks.Callback):
            def on_train_batch_end(cb, batch, logs=None):  # type: ignore[no-untyped-def]
                self.update()

        self.callback = Callback()
        self.model, self.total, self.start, self.step = model, total, total // 4, 0
        self.emas = {0.995: None, 0.998: None}
        self.swas = {1500: (None, 0), 800: (None, 0)}

    def update(self) -> None:
        self.step += 1
        if self.step < self.start:
            return
        w = [v.numpy() for v in self.model.trainable_variables]
        for m, avg in self.emas.items():
            self.emas[m] = (
                [a.copy() for a in w]
                if avg is None
                else [m * a + (1 - m) * b for a, b in zip(avg, w, strict=True)]
            )
        for last, (avg, n) in self.swas.items():
            if self.step > self.total - last:
                acc = w if avg is None else [a + b for a, b in zip(avg, w, strict=True)]
                self.swas[last] = ([a.copy() for a in acc] if avg is None else acc, n + 1)

    def candidates(self) -> dict:  # type: ignore[type-arg]
        out = {f"ema{m}": avg for m, avg in self.emas.items() if avg is not None}
        for last, (avg, n) in self.swas.items():
            if avg is not None:
                out[f"swa{last}"] = [a / n for a in avg]
        return out


def recalibrate_batchnorm(model: Any, x: Any, chunk: int = 1024) -> None:
    """Set every BatchNormalization layer's moving mean and variance from clean images `x`.

    During training the statistics are averaged over augmented batches of a moving network
    (and the EMA weights never had statistics of their own), so inference normalises with
    statistics of other inputs and other weights. One forward pass in training mode with the
    momentum at 0 (chunks beyond the first weighted as a running mean) replaces them with those
    of `x` under the current weights, layer after layer.
    """
    import keras

    norms = [
        layer for layer in _layers(model) if isinstance(layer, keras.layers.BatchNormalization)
    ]
    if not norms or len(x) == 0:
        return
    saved = [layer.momentum for layer in norms]
    try:
        for n, start in enumerate(range(0, len(x), chunk)):
            for layer in norms:
                layer.momentum = n / (n + 1)
            model(x[start : start + chunk], training=True)
    finally:
        for layer, momentum in zip(norms, saved, strict=True):
            layer.momentum = momentum


def _layers(model: Any) -> list[Any]:
    import keras

    out: list[Any] = []
    for layer in model.layers:
        out += _layers(layer) if isinstance(layer, keras.Model) else [layer]
    return out


def _score(infer, x, labels, alphabet):  # type: ignore[no-untyped-def]
    from captchaops.evaluation.accuracy import character_error_rate, sequence_accuracy
    from captchaops.model.ctc import decode_greedy

    probs = infer.predict(x, batch_size=256, verbose=0)
    preds = [t for t, _ in decode_greedy(probs, alphabet)]
    return sequence_accuracy(preds, labels), character_error_rate(preds, labels)


def run_fold(
    folder: Path, held: list[Path], tag: str, max_minutes: float, steps: int | None = None
) -> dict:
    import keras

    from captchaops.data.dataset import split_indices
    from captchaops.data.folder import read_folder
    from captchaops.model.ctc import encode_labels
    from captchaops.training.config import TrainConfig
    from captchaops.training.loop import (
        Monitor,
        Plan,
        Validation,
        compiled_crnn,
        holds_up,
        key,
        validate,
    )
    from captchaops.training.tensors import arrays, geometry

    config = TrainConfig.folder()
    if steps is not None:
        config = replace(config, max_steps=steps, min_steps=min(steps, config.min_steps))
    keras.utils.set_random_seed(config.seed)
    data = read_folder(folder)
    held_hashes = {hashlib.sha256(p.read_bytes()).digest() for p in held}
    keep = [i for i, im in enumerate(data.images) if hashlib.sha256(im).digest() not in held_hashes]
    held_idx = [i for i in range(len(data)) if i not in set(keep)]
    heldout = data.subset(held_idx)
    data = data.subset(keep)
    alphabet = "".join(sorted(set(data.alphabet()) | set(heldout.alphabet())))
    max_len = max(len(label) for label in data.labels)
    arch = geometry(config, data, max_len)
    splits = split_indices(data.names, config.val_fraction, 0.0)
    x = {n: arrays(data, idx, arch) for n, idx in splits.items() if idx}
    labels = {n: [data.labels[i] for i in idx] for n, idx in splits.items()}
    y = {n: encode_labels(labels[n], alphabet, max_len) for n in x}
    xh = arrays(heldout, list(range(len(heldout))), arch)
    val = Validation(x["val"], y["val"], labels["val"], alphabet)

    plan = Plan.of(config, len(x["train"]))
    assert config.ema_momentum is not None, "the folder preset averages its weights"
    start = time.monotonic()
    train_model, infer, schedule = compiled_crnn(
        config,
        arch,
        len(alphabet) + 1,
        augment=True,
        total_steps=plan.steps,
        deadline=start + max_minutes * 60,
    )
    monitor = Monitor(
        infer,
        val,
        schedule,
        lambda *a: None,
        lambda *a: None,
        min_steps=plan.min_steps,
        patience=config.patience_steps,
    )
    averages = _Averages(train_model, plan.steps)
    train_model.fit(
        x["train"],
        y["train"],
        batch_size=config.batch_size,
        epochs=config.epochs,
        callbacks=[schedule, monitor, averages.callback],
        verbose=0,
    )
    fit_minutes = (time.monotonic() - start) / 60
    final_weights = train_model.get_weights()
    out: dict = {
        "fold": tag,
        "steps": schedule.step,
        "epochs": len(monitor.history),
        "best_epoch": monitor.best_epoch + 1,
        "fit_minutes": round(fit_minutes, 2),
        "n_train": len(x["train"]),
        "n_val": len(labels["val"]),
        "n_heldout": len(heldout),
    }
    vals = {}
    for name, weights in (("final", final_weights), ("ckpt", monitor.best_weights)):
        for recal in (False, True):
            train_model.set_weights(weights)
            if recal:
                recalibrate_batchnorm(infer, x["train"])
            cand = f"{name}{'+bn' if recal else ''}"
            v = validate(infer, val)
            vals[cand] = v
            acc, cer = _score(infer, xh, heldout.labels, alphabet)
            tacc, tcer = _score(infer, x["train"], labels["train"], alphabet)
            out[cand] = {
                "heldout_acc": round(acc, 4),
                "heldout_cer": round(cer, 4),
                "val_acc": round(v["val_seq_acc"], 4),
                "val_cer": round(v["val_cer"], 4),
                "val_loss": round(v["val_loss"], 4),
                "train_acc": round(tacc, 4),
                "train_cer": round(tcer, 4),
            }
    for cand, trainable in averages.candidates().items():
        train_model.set_weights(final_weights)
        for var, value in zip(train_model.trainable_variables, trainable, strict=True):
            var.assign(value)
        recalibrate_batchnorm(infer, x["train"])
        v = validate(infer, val)
        acc, cer = _score(infer, xh, heldout.labels, alphabet)
        out[f"{cand}+bn"] = {
            "heldout_acc": round(acc, 4),
            "heldout_cer": round(cer, 4),
            "val_acc": round(v["val_seq_acc"], 4),
            "val_loss": round(v["val_loss"], 4),
        }
    n_val = len(labels["val"])
    out["rule_now"] = "final" if holds_up(vals["final"], monitor.best_key, n_val) else "ckpt"
    out["rule_bn"] = (
        "final+bn" if holds_up(vals["final+bn"], key(vals["ckpt+bn"]), n_val) else "ckpt+bn"
    )
    return out


def main(argv: list[str]) -> None:
    from benchmarks.bench_folder import _folds
    from captchaops.data import standin

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_folder_choice")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--count", type=int, default=1040)
    parser.add_argument("--only", type=int, nargs="*")
    parser.add_argument("--max-minutes", type=float, default=40.0)
    parser.add_argument("--steps", type=int, help="planned steps (default: the preset's)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "standin"
        standin.build(folder, args.count, seed=0)
        for k, fold in enumerate(_folds(folder, args.folds)):
            if args.only is not None and k not in args.only:
                continue
            print(
                json.dumps(run_fold(folder, fold, str(k), args.max_minutes, args.steps)), flush=True
            )


if __name__ == "__main__":
    main(sys.argv[1:])
