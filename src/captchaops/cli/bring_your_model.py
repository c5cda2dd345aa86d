"""`captchaops register`: an ONNX CTC network trained outside captchaops enters the registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from captchaops.cli.base import (
    ACTOR_OPTION,
    MODEL_NAME_OPTION,
    app,
    console,
    fail,
    parse_length,
    quiet_libraries,
    settings_for,
)
from captchaops.registry.errors import RegistryError
from captchaops.training import imported

CHOICES = {
    "input_layout": ("--layout", ("NHWC", "NCHW")),
    "pixel_scaling": ("--scaling", ("0..1", "-1..1", "mean_std")),
    "output_kind": ("--output", ("probabilities", "logits")),
    "output_layout": ("--output-layout", ("BTC", "TBC")),
    "blank": ("--blank", ("first", "last")),
}
META_FIELDS = {"alphabet", "min_length", "max_length", "height", "width", "channels"}
META_FIELDS |= {"pixel_mean", "pixel_std", *CHOICES}
MAX_META_BYTES = 64 * 1024


def _meta_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file() or file.stat().st_size > MAX_META_BYTES:
        fail(f"--meta {path} is not a JSON file under 64 KiB; pass the contract's JSON file")
    try:
        fields = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        fail(f"--meta {path} is not JSON ({exc}); fix the file")
    if not isinstance(fields, dict):
        fail(f"--meta {path} is not a JSON object of contract fields")
    unknown = sorted(set(fields) - META_FIELDS)
    if unknown:
        fail(f"--meta {path} has unknown fields {unknown}; it may hold {sorted(META_FIELDS)}")
    return fields


def _numbers(option: str, text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        fail(f"{option} {text!r} is not comma-separated numbers, e.g. {option} 0.485,0.456,0.406")
        raise


@app.command()
def register(
    onnx: str = typer.Option(
        ..., "--onnx", help="the exported ONNX file (one file, weights inside)"
    ),
    meta: str | None = typer.Option(
        None,
        "--meta",
        help="a JSON file of the fields below (meta.json names); options override it",
    ),
    alphabet: str | None = typer.Option(
        None, "--alphabet", help="the characters in the network's class order, without the blank"
    ),
    length: str | None = typer.Option(
        None, "--length", help="label lengths MIN-MAX (default: the frozen set's)"
    ),
    height: int | None = typer.Option(None, "--height", help="input height (default: the graph's)"),
    width: int | None = typer.Option(None, "--width", help="input width (default: the graph's)"),
    layout: str | None = typer.Option(None, "--layout", help="input layout NHWC | NCHW [NHWC]"),
    channels: int | None = typer.Option(None, "--channels", help="1 (grey) | 3 (RGB) [1]"),
    scaling: str | None = typer.Option(
        None, "--scaling", help="pixels 0..1 | -1..1 | mean_std (with --mean, --std) [0..1]"
    ),
    mean: str | None = typer.Option(
        None, "--mean", help="mean_std: per-channel means, 0.5,0.5,0.5"
    ),
    std: str | None = typer.Option(
        None, "--std", help="mean_std: per-channel stds, 0.25,0.25,0.25"
    ),
    output: str | None = typer.Option(
        None, "--output", help="the output is probabilities | logits (or log-probabilities)"
    ),
    output_layout: str | None = typer.Option(
        None, "--output-layout", help="BTC ([batch, steps, classes]) | TBC [BTC]"
    ),
    blank: str | None = typer.Option(
        None, "--blank", help="the CTC blank's class: first | last [last]"
    ),
    actor: str | None = ACTOR_OPTION,
    model_name: str | None = MODEL_NAME_OPTION,
) -> None:
    """Register an ONNX CTC model trained elsewhere: checked, scored on the frozen set, staged."""
    settings = settings_for(model_name)
    fields = _meta_file(meta) if meta else {}
    given: dict[str, Any] = {
        "alphabet": alphabet,
        "height": height,
        "width": width,
        "channels": channels,
        "input_layout": layout,
        "pixel_scaling": scaling,
        "output_kind": output,
        "output_layout": output_layout,
        "blank": blank,
        "pixel_mean": _numbers("--mean", mean) if mean else None,
        "pixel_std": _numbers("--std", std) if std else None,
    }
    fields |= {k: v for k, v in given.items() if v is not None}
    if length is not None:
        try:
            fields["min_length"], fields["max_length"] = parse_length(length)
        except ValueError as exc:
            fail(str(exc))
    for field, (option, allowed) in CHOICES.items():
        if field in fields and fields[field] not in allowed:
            fail(f"{option} {fields[field]!r} is not one of {', '.join(allowed)}")
    log = settings.home_dir / "logs" / "libraries.log"
    try:
        with quiet_libraries(log):
            done = imported.register_onnx(settings, Path(onnx), fields, actor=actor)
    except (imported.RegisterError, RegistryError) as exc:
        fail(str(exc))
    m = done.metrics
    console.print(
        f"registered {settings.model_name} v{done.version} from {Path(onnx).name}: frozen-set "
        f"accuracy {m['test_seq_acc']:.4f}, CER {m['test_cer']:.4f} (run {done.run_id})",
        highlight=False,
    )
    if done.staged:
        console.print(
            f"staged as @staging; next: captchaops promote --auto --model-name {settings.model_name}",
            highlight=False,
        )
    else:
        console.print(f"not staged: {done.rejection_reason}", highlight=False)
    if done.report_uri:
        console.print(f"report: {done.report_uri}", highlight=False)
