"""The `captchaops` command: thin typer wrappers over the stage functions."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from captchaops.settings import load_settings

app = typer.Typer(
    help="captchaops: a self-hosted MLOps pipeline for text-CAPTCHA recognition.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)


class UserError(Exception):
    """An error a user can fix; printed as one line, exit code 1."""


def fail(message: str, code: int = 1) -> None:
    """Print one line and exit non-zero."""
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


# --- commands are added below, one thin wrapper each ---------------------------------


def main() -> None:
    """Console-script entry point: user errors become one line, never a traceback."""
    try:
        app()
    except UserError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
