"""What every command shares: the typer app, the two consoles, one-line failures, options."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from captchaops.console import literal
from captchaops.settings import Settings, load_settings

app = typer.Typer(
    help="captchaops: a self-hosted MLOps pipeline for text-CAPTCHA recognition.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# No markup: what the CLI prints comes from the registry, runs and servers (a tag holding `[/x]`
# must print as itself); styles are added as Text where the CLI wants them.
console = Console(soft_wrap=True, markup=False)
err = Console(stderr=True, soft_wrap=True, markup=False)


def fail(message: str, code: int = 1) -> None:
    """Print one line and exit non-zero."""
    err.print(Text.assemble(("error:", "red"), " ", literal(message)), highlight=False)
    raise typer.Exit(code)


MODEL_NAME_OPTION = typer.Option(
    None,
    "--model-name",
    help="the scheme (registered model) to act on; default: CAPTCHAOPS_MODEL_NAME or text-captcha",
    show_default=False,
)

ACTOR_OPTION = typer.Option(
    None, "--actor", envvar="CAPTCHAOPS_ACTOR", help="who is acting (default: your login name)"
)


def settings_for(model_name: str | None) -> Settings:
    """The settings, for the scheme named with --model-name when one is given.

    The name check is MLflow-free: `serve` uses this too, and importing the registry would
    add about 110 MB to every model server.
    """
    from captchaops.scheme_names import model_name_problem

    settings = load_settings(model_name=model_name) if model_name else load_settings()
    problem = model_name_problem(settings.model_name)
    if problem:
        fail(problem)
    return settings


def require_access(settings: Settings, action: str) -> None:
    """Fail in one line, before any work, unless this login may do `action` (team mode)."""
    from captchaops.access import AccessError, check

    try:
        check(settings, action)
    except AccessError as exc:
        fail(str(exc))


def audited_actor(settings: Settings, given: str | None) -> str | None:
    """Who the audit trail names: the account the tracking server authenticates, where there is
    one (a different --actor is kept beside it, never instead); else --actor or the login name."""
    account = settings.tracking_username
    if not account:
        return given
    return account if given in (None, account) else f"{account} (as {given})"


def parse_length(text: str) -> tuple[int, int]:
    """`MIN-MAX` (or one number) as a label length range; ValueError with the fix if malformed."""
    found = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    lengths = (int(found[1]), int(found[2] or found[1])) if found else (0, 0)
    if not 1 <= lengths[0] <= lengths[1]:
        raise ValueError(
            f"--length {text!r} is not a label length range; write MIN-MAX with "
            "1 <= MIN <= MAX, e.g. --length 4-6 (or --length 5)"
        )
    return lengths


@contextmanager
def quiet_libraries(log: Path) -> Iterator[None]:
    """Libraries' output goes to `log`; this command's own errors still reach the terminal."""
    from captchaops.console import library_output_to

    with library_output_to(log) as terminal:
        err.file = terminal
        try:
            yield
        finally:
            err.file = None  # type: ignore[assignment]  # follows sys.stderr again, as at start


REGISTRY_COMMANDS = {"models", "promote", "rollback", "approve", "requests", "evalset", "register"}


@app.callback()
def _before(ctx: typer.Context) -> None:
    """Registry commands give up after ~30 s of tracking errors (MLflow's default is ~4 min) and
    draw no download bars."""
    if ctx.invoked_subcommand in REGISTRY_COMMANDS:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        # The CLI says what happened in its own lines; MLflow's download bars on stderr would
        # turn a one-line error (a full disk, a refused promotion) into twenty.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
