"""The `captchaops` command: thin typer wrappers over the stage functions."""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import typer
from rich.console import Console

from captchaops.settings import Settings, load_settings

app = typer.Typer(
    help="captchaops: a self-hosted MLOps pipeline for text-CAPTCHA recognition.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class UserError(Exception):
    """An error a user can fix; printed as one line, exit code 1."""


def fail(message: str, code: int = 1) -> None:
    """Print one line and exit non-zero."""
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


MODEL_NAME_OPTION = typer.Option(
    None,
    "--model-name",
    help="the scheme (registered model) to act on; default: CAPTCHAOPS_MODEL_NAME or text-captcha",
    show_default=False,
)


def settings_for(model_name: str | None) -> Settings:
    """The settings, for the scheme named with --model-name when one is given."""
    from captchaops.registry import RegistryError, check_model_name

    settings = load_settings(model_name=model_name) if model_name else load_settings()
    try:
        check_model_name(settings.model_name)
    except RegistryError as exc:
        fail(str(exc))
    return settings


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


REGISTRY_COMMANDS = {"models", "promote", "rollback", "evalset"}


@app.callback()
def _before(ctx: typer.Context) -> None:
    """Registry commands give up after ~30 s of tracking errors (MLflow's default is ~4 min)."""
    if ctx.invoked_subcommand in REGISTRY_COMMANDS:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


# --- commands are added below, one thin wrapper each ---------------------------------


@app.command()
def up(
    core: bool = typer.Option(False, "--core", help="only the object store and tracking server"),
) -> None:
    """Start the local stack (store, tracking server, model servers, web app) and wait for health."""
    from captchaops.stack import control, services
    from captchaops.stack.store import StoreError

    names = services.CORE if core else services.ALL
    try:
        control.up(load_settings(), names, say=lambda line: console.print(line, highlight=False))
    except (control.StackError, StoreError) as exc:
        fail(str(exc))


@app.command()
def down() -> None:
    """Stop every service of the local stack."""
    from captchaops.stack import control

    if control.down(load_settings()):
        console.print("stack stopped")
    else:
        console.print("nothing was running")


@app.command()
def status() -> None:
    """Show each service (pid, URL, health, memory) and the effective settings."""
    from rich.table import Table

    from captchaops.stack import control

    settings = load_settings()
    table = Table(title="captchaops services")
    for column in ("service", "pid", "state", "URL", "health", "RSS MB"):
        table.add_column(column)
    rows = control.status(settings)
    for row in rows:
        table.add_row(
            row.name,
            str(row.pid or "-"),
            row.state,
            row.url,
            "[green]ok[/green]" if row.healthy else "[red]down[/red]",
            f"{row.rss_mb:.0f}",
        )
    console.print(table)
    console.print(f"total RSS: {sum(row.rss_mb for row in rows):.0f} MB")
    conf = Table(title="effective settings")
    conf.add_column("setting")
    conf.add_column("value")
    for key, value in settings.masked().items():
        conf.add_row(key, value)
    console.print(conf)


@app.command()
def logs(
    service: str = typer.Argument(
        ..., help="store, tracking, production, staging, app, supervisord"
    ),
    follow: bool = typer.Option(False, "-f", "--follow", help="keep printing new lines"),
    lines: int = typer.Option(50, "-n", "--lines", help="how many past lines to show"),
) -> None:
    """Print a service's log."""
    from captchaops.stack import control

    try:
        path = control.log_file(load_settings(), service)
        for line in control.follow(path, lines=lines, forever=follow):
            sys.stdout.write(line)
            sys.stdout.flush()
    except control.StackError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


@app.command()
def serve(
    alias: str = typer.Option("production", "--alias", help="registry alias to serve"),
    port: int | None = typer.Option(None, "--port", help="default: the alias's port setting"),
    host: str | None = typer.Option(None, "--host", help="default: the host setting (loopback)"),
    model_name: str | None = MODEL_NAME_OPTION,
) -> None:
    """Serve models:/<model_name>@<alias> over HTTP, swapping in new versions as the alias moves."""
    from captchaops.serving import ServeError, run

    # Not settings_for: its name check imports the registry (MLflow, pandas: +110 MB per server).
    settings = load_settings(model_name=model_name) if model_name else load_settings()
    default_port = settings.staging_port if alias == "staging" else settings.production_port
    try:
        run(settings, alias, port or default_port, host)
    except ServeError as exc:
        fail(str(exc))


ACTOR_OPTION = typer.Option(
    None, "--actor", envvar="CAPTCHAOPS_ACTOR", help="who is acting (default: your login name)"
)


@app.command()
def models(
    limit: int = typer.Option(20, help="show at most this many versions"),
    model_name: str | None = MODEL_NAME_OPTION,
) -> None:
    """List model versions with aliases, metrics, validation status and the last alias moves."""
    from rich.table import Table

    from captchaops import registry

    settings = settings_for(model_name)
    try:
        listing = registry.list_versions(settings, limit=limit)
    except registry.RegistryError as exc:
        fail(str(exc))
    table = Table(title=f"{listing.name} versions")
    for column in (
        "version",
        "aliases",
        "stage",
        "status",
        "test acc",
        "frozen acc",
        "frozen CER",
        "created (UTC)",
        "note",
    ):
        table.add_column(column)
    for row in listing.rows:
        table.add_row(
            row.version,
            ", ".join(f"@{a}" for a in row.aliases) or "-",
            row.stage,
            row.status,
            *(
                f"{v:.4f}" if v is not None else "-"
                for v in (row.test_seq_acc, row.eval_seq_acc, row.eval_cer)
            ),
            row.created,
            row.note[:60],
        )
    console.print(table)
    for alias, line in sorted(listing.last_moves.items()):
        console.print(f"last {alias} move: {line}", highlight=False)


@app.command()
def promote(
    version: str | None = typer.Option(None, "--version", help="version number to promote"),
    from_alias: str | None = typer.Option(
        None, "--from", help="promote the version with this alias"
    ),
    reason: str = typer.Option("", "--reason", help="why (recorded in the audit trail)"),
    force: bool = typer.Option(False, "--force", help="promote even a rejected or failing version"),
    auto: bool = typer.Option(
        False, "--auto", help="let the gate decide: exit 0 promoted, 3 rejected, 1 error"
    ),
    margin: float = typer.Option(
        0.0, help="gate: accuracy the candidate must add over the champion"
    ),
    floor: float | None = typer.Option(
        None, help="gate: accuracy a first candidate needs (default: staging floor)"
    ),
    cer_tolerance: float = typer.Option(0.0, help="gate: how much worse the CER may be"),
    latency_ratio: float = typer.Option(
        1.5, help="gate: p95 latency budget as a multiple of the champion's"
    ),
    latency_slack_ms: float = typer.Option(
        5.0, help="gate: milliseconds added to the latency budget"
    ),
    actor: str | None = ACTOR_OPTION,
    model_name: str | None = MODEL_NAME_OPTION,
) -> None:
    """Move @production: by hand (--version N | --from staging) or through the gate (--auto)."""
    from captchaops import gate, registry

    settings = settings_for(model_name)
    try:
        if not auto:
            if not reason:
                fail('say why with --reason "..." (it goes into the audit trail)')
            manual = registry.promote(
                settings,
                version=version,
                from_alias=from_alias,
                reason=reason,
                actor=actor,
                force=force,
            )
            console.print(f"promoted: {manual.line()}", highlight=False)
            return
        config = gate.GateConfig(
            margin=margin,
            floor=floor,
            cer_tolerance=cer_tolerance,
            latency_ratio=latency_ratio,
            latency_slack_ms=latency_slack_ms,
        )
        decision, _ = gate.auto_promote(settings, config, actor=actor, reason=reason)
    except registry.RegistryError as exc:
        fail(str(exc), gate.EXIT_ERROR)
    for role, result in (("candidate", decision.candidate), ("champion", decision.champion)):
        if result is not None and result.ok:
            console.print(
                f"{role} v{result.version}: accuracy {result.seq_acc:.4f}  CER {result.cer:.4f}  "
                f"p50 {result.p50_ms:.1f} ms  p95 {result.p95_ms:.1f} ms  ({result.n} images)",
                highlight=False,
            )
        elif result is not None:
            console.print(f"{role} v{result.version}: failed ({result.error})", highlight=False)
    if decision.promote:
        console.print(
            f"[green]promoted[/green] v{decision.candidate_version}: {decision.reason()}",
            highlight=False,
        )
        raise typer.Exit(gate.EXIT_PROMOTED)
    console.print(
        f"[yellow]rejected[/yellow] v{decision.candidate_version}: {decision.reason()}",
        highlight=False,
    )
    raise typer.Exit(gate.EXIT_REJECTED)


@app.command()
def rollback(
    to: str | None = typer.Option(
        None, "--to", help="an earlier production version (default: the previous one)"
    ),
    reason: str = typer.Option("", "--reason", help="why (recorded in the audit trail)"),
    actor: str | None = ACTOR_OPTION,
    model_name: str | None = MODEL_NAME_OPTION,
) -> None:
    """Move @production back to the previous production version in the audit trail."""
    from captchaops import registry

    settings = settings_for(model_name)
    try:
        move = registry.rollback(settings, to=to, reason=reason, actor=actor)
    except registry.RegistryError as exc:
        fail(str(exc))
    console.print(f"rolled back: {move.line()}", highlight=False)


@app.command()
def evalset(
    size: int = typer.Option(2000, min=0, help="generated images (fixed seed)"),
    folder: str | None = typer.Option(
        None, help="also include images named <label>.png from here (--size 0: only these)"
    ),
    alphabet: str | None = typer.Option(
        None,
        "--alphabet",
        help="characters of generated labels (default: 0-9A-Z)",
    ),
    length: str = typer.Option("4-4", "--length", help="generated label lengths MIN-MAX, e.g. 4-6"),
    replace: bool = typer.Option(False, "--replace", help="make a new set even if one exists"),
    model_name: str | None = MODEL_NAME_OPTION,
) -> None:
    """Create the frozen evaluation set every version is judged on (stored by digest)."""
    from captchaops import registry
    from captchaops.data.synthetic import DIGITS_UPPER
    from captchaops.evalset import create_evalset

    settings = settings_for(model_name)
    try:
        lengths = parse_length(length)
    except ValueError as exc:
        fail(str(exc))
    if alphabet is not None and (not alphabet or any(ch.isspace() for ch in alphabet)):
        fail("--alphabet needs at least one character and no spaces, e.g. --alphabet 0123456789")
    try:
        with registry.one_line_errors(settings):
            made = create_evalset(
                settings,
                size=size,
                folder=Path(folder) if folder else None,
                alphabet=alphabet or DIGITS_UPPER,
                length=lengths,
                replace=replace,
            )
    except registry.RegistryError as exc:
        fail(str(exc))
    console.print(
        f"frozen evaluation set {made.digest} of {settings.model_name} "
        f"({len(made)} images, seed {made.seed})",
        highlight=False,
    )


@app.command("sample-data")
def sample_data(
    directory: str = typer.Argument(..., help="an empty or new folder to write the images into"),
    count: int = typer.Option(1040, "--count", min=1, help="how many images"),
    seed: int = typer.Option(0, "--seed", help="the same seed writes the same images"),
) -> None:
    """Write stand-in CAPTCHAs (200x50, 5 characters, <label>.png) to try `train --data` on."""
    from captchaops.data import standin

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


@app.command("app")
def webapp(
    port: int | None = typer.Option(None, "--port", help="default: the app_port setting (8080)"),
    host: str | None = typer.Option(None, "--host", help="default: the host setting (loopback)"),
) -> None:
    """Serve the demo web page and JSON API over the model servers (waitress, never debug)."""
    from captchaops.webapp.app import run

    try:
        run(load_settings(), port, host)
    except OSError as exc:
        fail(f"cannot listen for the web app ({exc}); pick a free port with --port")


users_app = typer.Typer(
    help="Team accounts on the tracking server (team mode: CAPTCHAOPS_AUTH=true).",
    no_args_is_help=True,
)
app.add_typer(users_app, name="users")


@users_app.command("add")
def users_add(
    name: str = typer.Argument(..., help="the new user's login name"),
    role: str = typer.Option("reader", "--role", help="reader, editor or admin"),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="read the password from standard input"
    ),
) -> None:
    """Create an account: readers read, editors train/register/promote, admins manage users."""
    from captchaops import users

    password = sys.stdin.readline().rstrip("\r\n") if password_stdin else None
    try:
        account = users.add_user(load_settings(), name, role, password)
    except users.UsersError as exc:
        fail(str(exc))
    console.print(f"created {account.role} {account.username}", highlight=False)
    for grant in account.grants:
        console.print(f"  {grant}", highlight=False)
    if account.password:
        console.print(f"password (shown once): {account.password}", highlight=False)


@users_app.command("service")
def users_service() -> None:
    """Create or refresh the service account the model servers and the web app log in with."""
    from captchaops import users

    try:
        account = users.ensure_service_account(load_settings())
    except users.UsersError as exc:
        fail(str(exc))
    console.print(f"service account {account.username} ready", highlight=False)
    for grant in account.grants:
        console.print(f"  {grant}", highlight=False)


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
    model_name: str | None = MODEL_NAME_OPTION,
) -> None:
    """Train a CRNN (folder preset with --data, demo preset otherwise), log it and register it."""
    from captchaops import train as training

    if data is not None and synthetic is not None:
        fail("use either --data DIR or --synthetic N, not both")
    settings = settings_for(model_name)
    preset = training.TrainConfig.folder() if data else training.TrainConfig.demo()
    config = training.with_overrides(
        preset,
        data_dir=Path(data) if data else None,
        synthetic=synthetic,
        epochs=epochs,
        batch_size=batch_size,
        max_minutes=max_minutes,
        val_fraction=val_fraction,
        seed=seed,
        include_feedback=include_feedback or None,
    )
    try:
        result = training.train_with_progress(config, settings, console)
    except (training.DataError, training.TrainError) as exc:
        fail(str(exc))
    training.print_summary(result, console)


@app.command()
def demo(
    retrain: bool = typer.Option(False, "--retrain", help="train again even if production exists"),
) -> None:
    """Run the whole pipeline: stack up, train, gate, promote, serve; print the URLs."""
    from captchaops import train as training
    from captchaops.demo import run_demo
    from captchaops.registry import RegistryError
    from captchaops.stack.control import StackError
    from captchaops.stack.store import StoreError

    try:
        summary = run_demo(
            load_settings(),
            say=lambda line: console.print(line, highlight=False),
            retrain=retrain,
            trainer=lambda config, settings: training.train_with_progress(
                config, settings, console
            ),
        )
    except (StackError, StoreError, RegistryError, training.DataError, training.TrainError) as exc:
        fail(str(exc))
    console.print()
    for name, url in summary.urls.items():
        console.print(f"{name:<20} {url}", highlight=False)
    console.print()
    for line in summary.lines:
        console.print(line, highlight=False)
    console.print("\nstop everything with: .venv/bin/captchaops down", highlight=False)


def main() -> None:
    """Console-script entry point: user errors become one line, never a traceback."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    try:
        app()
    except UserError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
