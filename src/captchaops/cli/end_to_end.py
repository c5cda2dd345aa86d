"""`demo`: the whole pipeline end to end (stack up, train, gate, promote, serve)."""

from __future__ import annotations

from functools import partial

import typer

from captchaops.cli.base import app, console, fail, quiet_libraries
from captchaops.console import UnexpectedError, progress_bar
from captchaops.data.dataset import DataError
from captchaops.demo import run_demo
from captchaops.registry.errors import RegistryError
from captchaops.settings import load_settings
from captchaops.stack.control import StackError
from captchaops.stack.store import StoreError
from captchaops.training import TrainError


@app.command()
def demo(
    retrain: bool = typer.Option(False, "--retrain", help="train again even if production exists"),
) -> None:
    """Run the whole pipeline: stack up, train, gate, promote, serve; print the URLs."""
    settings = load_settings()
    log = settings.home_dir / "logs" / "libraries.log"
    try:
        with quiet_libraries(log):
            summary = run_demo(
                settings,
                say=lambda line: console.print(line, highlight=False),
                retrain=retrain,
                progress=partial(progress_bar, console),
            )
    except (
        StackError,
        StoreError,
        RegistryError,
        DataError,
        TrainError,
        UnexpectedError,
    ) as exc:
        fail(str(exc))
    console.print()
    for name, url in summary.urls.items():
        console.print(f"{name:<20} {url}", highlight=False)
    console.print()
    for line in summary.lines:
        console.print(line, highlight=False)
    console.print(f"library messages: {log}", highlight=False, style="dim")
    console.print("stop everything with: .venv/bin/captchaops down", highlight=False)
