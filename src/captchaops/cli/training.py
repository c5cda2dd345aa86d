"""Commands that make models: sample data and train."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from captchaops.cli.base import (
    MODEL_NAME_OPTION,
    app,
    console,
    fail,
    quiet_libraries,
    require_access,
    settings_for,
)
from captchaops.cli.scaleout import submitted, train_ensemble
from captchaops.console import UnexpectedError, print_summary, progress_bar
from captchaops.data import standin
from captchaops.data.dataset import DataError
from captchaops.training import TrainError


@app.command("sample-data")
def sample_data(
    directory: str = typer.Argument(..., help="an empty or new folder to write the images into"),
    count: int = typer.Option(1040, "--count", min=1, help="how many images"),
    seed: int = typer.Option(0, "--seed", help="the same seed writes the same images"),
) -> None:
    """Write stand-in CAPTCHAs (200x50, 5 characters, <label>.png) to try `train --data` on."""
    folder = Path(directory)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        fail(f"{folder} is not an empty folder; name a new or empty one (nothing is overwritten)")
    try:
        written = standin.build(folder, count, seed)
    except OSError as exc:
        fail(f"cannot write to {folder} ({exc}); pick a writable folder")
    console.print(
        f"wrote {len(written)} stand-in CAPTCHAs to {folder}; "
        f"next: captchaops train --data {shlex.quote(str(folder))}",
        highlight=False,
    )


@app.command("train")
def train_command(
    data: str | None = typer.Option(None, "--data", help="folder of images named <label>.png"),
    synthetic: int | None = typer.Option(None, "--synthetic", help="generate N CAPTCHAs instead"),
    epochs: int | None = typer.Option(None, "--epochs", help="at most this many epochs"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    max_minutes: float | None = typer.Option(None, "--max-minutes", help="hard time budget"),
    val_fraction: float | None = typer.Option(None, "--val-fraction"),
    seed: int | None = typer.Option(None, "--seed"),
    include_feedback: bool = typer.Option(
        False, "--include-feedback", help="add corrections submitted in the web app"
    ),
    steps: int | None = typer.Option(None, "--steps", help="optimiser steps the schedule plans"),
    members: int = typer.Option(
        1, "--members", min=1, help="train K members on Ray and register them as one version"
    ),
    cluster: str | None = typer.Option(
        None, "--cluster", envvar="RAY_ADDRESS", help="Ray cluster for --members (default: local)"
    ),
    gpus: float = typer.Option(
        0.0, "--gpus-per-trial", min=0.0, help="GPUs each member asks Ray for (with --members)"
    ),
    preset_name: str | None = typer.Option(
        None, "--preset", help="demo, folder, accuracy or gpu (default: folder with --data)"
    ),
    model_name: str | None = MODEL_NAME_OPTION,
    submit: str | None = typer.Option(
        None, "--submit", help="with --members: run as a Ray job via the head's dashboard URL"
    ),
) -> None:
    """Train a CRNN (folder preset with --data, demo preset otherwise), log it and register it."""
    if data is not None and synthetic is not None:
        fail("use either --data DIR or --synthetic N, not both")
    if gpus and members == 1:
        fail("--gpus-per-trial is for Ray's runs: add --members K, or leave it out")
    if submit is not None:
        if members == 1:
            fail("--submit runs members on a Ray cluster: add --members K, or leave it out")
        options: dict[str, object] = {"--data": data, "--synthetic": synthetic, "--epochs": epochs}
        options |= {"--batch-size": batch_size, "--max-minutes": max_minutes, "--seed": seed}
        options |= {"--val-fraction": val_fraction, "--include-feedback": include_feedback}
        options |= {"--steps": steps, "--members": members, "--preset": preset_name}
        submitted(submit, "train", options | {"--gpus-per-trial": gpus or None}, model_name)
        return
    settings = settings_for(model_name)
    require_access(settings, "train")
    log = settings.home_dir / "logs" / "libraries.log"
    try:
        with quiet_libraries(log):  # Keras and TensorFlow print on import
            # here, not at the top: TensorFlow (~6 s) prints on import, so it loads once its
            # output goes to the log, and `train --help` or a bad option answers without it
            from captchaops.training import run as training
            from captchaops.training.config import from_options

            config = from_options(
                preset_name,
                data,
                synthetic=synthetic,
                epochs=epochs,
                batch_size=batch_size,
                max_minutes=max_minutes,
                val_fraction=val_fraction,
                seed=seed,
                include_feedback=include_feedback or None,
                max_steps=steps,
            )
            if members > 1:
                train_ensemble(config, settings, members, cluster, gpus)
                return
            with progress_bar(console) as report:
                result = training.train(config, settings, report)
    except (DataError, TrainError, UnexpectedError) as exc:
        fail(str(exc))
    print_summary(result, console)
    console.print(f"library messages: {log}", highlight=False, style="dim")
