"""The report's four figures, drawn with matplotlib from `captchaops.evaluation.report.build`'s numbers.

Imported only where matplotlib is installed (`report.render` checks first).
"""

from __future__ import annotations

import io
import math
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image


def figures(report: dict[str, Any], images: list[bytes]) -> dict[str, Any]:
    """File name -> matplotlib figure for each of the report's PNGs."""
    return {
        "confusion_matrix.png": _confusion(report),
        "worst_read.png": _worst(report, images),
        "accuracy_by_length.png": _by_length(report),
        "reliability.png": _reliability(report),
    }


def close(figure: Any) -> None:
    """Free a figure's memory (pyplot keeps every figure until closed)."""
    plt.close(figure)


def _title(report: dict[str, Any], what: str) -> str:
    who = f"{report.get('model_name', '')} v{report.get('version', '?')}"
    return f"{who}: {what} (n={report['n']}, accuracy {report['seq_acc']:.1%})"


def _confusion(report: dict[str, Any]) -> Any:
    chars = report["confusion_matrix"]["characters"]
    counts = np.array(report["confusion_matrix"]["counts"], dtype=np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    size = max(5.0, 0.28 * len(chars) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    shown = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(chars)), chars, fontsize=7)
    ax.set_yticks(range(len(chars)), chars, fontsize=7)
    ax.set_xlabel("read as")
    ax.set_ylabel("true character")
    for t, p in zip(*np.nonzero((counts > 0) & ~np.eye(len(chars), dtype=bool)), strict=True):
        ax.text(p, t, str(int(counts[t, p])), ha="center", va="center", fontsize=5, color="red")
    fig.colorbar(shown, ax=ax, fraction=0.046, label="share of the true character's readings")
    ax.set_title(_title(report, "character confusions"), fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.9, bottom=0.07, top=0.94)
    return fig


def _worst(report: dict[str, Any], images: list[bytes]) -> Any:
    worst = report["worst"]
    cols = 4
    rows = max(1, math.ceil(len(worst) / cols))
    height = rows * 1.4 + 0.6
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.8, height))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, item in zip(np.ravel(axes), worst, strict=False):
        ax.imshow(Image.open(io.BytesIO(images[item["index"]])).convert("RGB"))
        ax.set_title(
            f"true {item['label']} / read {item['text'] or '(nothing)'}\n"
            f"confidence {item['confidence']:.2f}",
            fontsize=7,
            color="red",
        )
    fig.suptitle(_title(report, "worst-read images"), fontsize=9)
    fig.subplots_adjust(
        left=0.01, right=0.99, bottom=0.01, top=1 - 0.6 / height, hspace=0.6, wspace=0.05
    )
    return fig


def _by_length(report: dict[str, Any]) -> Any:
    lengths = list(report["by_length"])
    rows = [report["by_length"][k] for k in lengths]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(lengths) + 2), 3.2))
    bars = ax.bar(lengths, [r["accuracy"] for r in rows], color="#4c72b0")
    for bar, row in zip(bars, rows, strict=True):
        ax.annotate(f"n={row['n']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7)  # fmt: skip
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("label length")
    ax.set_ylabel("sequence accuracy")
    ax.set_title(_title(report, "accuracy by label length"), fontsize=9)
    fig.tight_layout()
    return fig


def _reliability(report: dict[str, Any]) -> Any:
    bins = [b for b in report["reliability"] if b["n"]]
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    ax.plot(
        [b["confidence"] for b in bins],
        [b["accuracy"] for b in bins],
        marker="o",
        color="#dd8452",
        label=f"this version (ECE {report['expected_calibration_error']:.3f})",
    )
    for b in bins:
        ax.annotate(str(b["n"]), (b["confidence"], b["accuracy"]), fontsize=6,
                    textcoords="offset points", xytext=(3, -8))  # fmt: skip
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(_title(report, "reliability"), fontsize=8)
    fig.tight_layout()
    return fig
