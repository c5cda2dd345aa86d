"""What every command shares: the typer app and its command table, the two consoles, one-line
failures, options."""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from captchaops.access import AccessError, check
from captchaops.console import library_output_to, literal
from captchaops.scheme_names import model_name_problem
from captchaops.settings import Settings, load_settings

COMMANDS: dict[str, tuple[str, str]] = {
    "up": (
        "stack",
        "Start the local stack (store, tracking server, model servers, web app) and wait for health.",
    ),
    "down": ("stack", "Stop every service of the local stack."),
    "status": ("stack", "Show each service (pid, URL, health, memory) and the effective settings."),
    "logs": ("stack", "Print a service's log."),
    "serve": (
        "serve",
        "Serve models:/<model_name>@<alias> over HTTP, swapping in new versions as the alias moves.",
    ),
    "app": (
        "web",
        "Serve the demo web page and JSON API over the model servers (waitress, never debug).",
    ),
    "sample-data": (
        "training",
        "Write stand-in CAPTCHAs (200x50, 5 characters, <label>.png) to try `train --data` on.",
    ),
    "train": (
        "training",
        "Train a CRNN (folder preset with --data, demo preset otherwise), log it and register it.",
    ),
    "demo": (
        "end_to_end",
        "Run the whole pipeline: stack up, train, gate, promote, serve; print the URLs.",
    ),
    "cv": (
        "scaleout",
        "Cross-validated held-out accuracy of the folder preset: one training run per fold on Ray.",
    ),
    "tune": (
        "scaleout",
        "Search training settings (Optuna TPE on Ray Tune, ASHA) and register the best trial.",
    ),
    "models": (
        "registry",
        "List model versions with aliases, metrics, validation status and the last alias moves.",
    ),
    "promote": (
        "registry",
        "Move @production: by hand (--version N | --from staging), through the gate (--auto), "
        "or try a candidate on a share of production's traffic first (--canary PERCENT).",
    ),
    "rollback": (
        "registry",
        "Move @production back to the previous production version in the audit trail, or end "
        "the canary (--canary).",
    ),
    "approve": (
        "registry",
        "Approve another account's pending @production move: its checks (the gate) run again "
        "and the signed move names you as approver. Exit 0 moved, 3 the gate now refuses, "
        "1 error.",
    ),
    "requests": (
        "registry",
        "List the @production moves waiting for a second account's approval, oldest first.",
    ),
    "evalset": (
        "registry",
        "Create the frozen evaluation set every version is judged on (stored by digest).",
    ),
    "register": (
        "bring_your_model",
        "Register an ONNX CTC model trained elsewhere: checked, scored on the frozen set, staged.",
    ),
    "promotions": (
        "registry",
        "Signed alias moves: model servers follow only moves signed by the promotion key.",
    ),
    "users": ("users", "Team accounts on the tracking server (team mode: CAPTCHAOPS_AUTH=true)."),
}
"""Each command (in the order `--help` lists them) -> the module of `captchaops.cli` that
defines it, and the line `--help` shows for it. This table is the CLI's one lazy boundary:
`captchaops --help` imports none of the command modules, and a command imports only its own
(`train` never loads MLflow's registry commands, `serve` never loads the stack's);
tests/unit/test_cli_commands.py checks the table against the commands."""


class Commands(TyperGroup):
    """The root command: lists the table's commands and imports a command's module only when
    that command runs (its own `--help` included).

    `ctx` is click's Context, which recent typer versions vendor (`typer._click`): typed `Any`
    so the override matches whichever click the installed typer uses."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> TyperCommand | None:
        """The command as `--help` lists it: its name and line, its module not imported."""
        if cmd_name not in COMMANDS:
            return None
        return TyperCommand(cmd_name, help=COMMANDS[cmd_name][1])

    def resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, Any, list[str]]:
        name = args[0]
        if name not in COMMANDS:
            close = get_close_matches(name, list(COMMANDS))
            hint = f" Did you mean {', '.join(repr(m) for m in close)}?" if close else ""
            ctx.fail(f"No such command {name!r}.{hint}")
        if name not in self.commands:
            importlib.import_module(f"captchaops.cli.{COMMANDS[name][0]}")
            self.commands.update(typer.main.get_group(app).commands)
        return name, self.commands[name], args[1:]


app = typer.Typer(
    cls=Commands,
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
    settings = load_settings(model_name=model_name) if model_name else load_settings()
    problem = model_name_problem(settings.model_name)
    if problem:
        fail(problem)
    return settings


def require_access(settings: Settings, action: str) -> None:
    """Fail in one line, before any work, unless this login may do `action` (team mode)."""
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
