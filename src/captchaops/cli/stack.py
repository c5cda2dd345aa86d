"""Commands that run the local stack: up, down, status and logs."""

from __future__ import annotations

import sys

import typer

from captchaops.cli.base import app, console, fail
from captchaops.console import literal, live_lines, print_settings, services_table, unaudited_lines
from captchaops.live import reported as live
from captchaops.registry.unaudited import last_moves, unaudited_aliases
from captchaops.settings import Settings, load_settings, mask_credentials
from captchaops.stack import control, services, webhooks
from captchaops.stack.store import StoreError
from captchaops.tracking_rest import TrackingError, TrackingRest


@app.command()
def up(
    core: bool = typer.Option(False, "--core", help="only the object store and tracking server"),
    replicas: int | None = typer.Option(
        None,
        "--replicas",
        help="model servers per alias, behind a balancer (HAProxy) when over 1 "
        "(default: as running, else 1)",
    ),
) -> None:
    """Start the local stack (store, tracking server, model servers, web app) and wait for health."""
    names = services.CORE if core else services.ALL
    try:
        control.up(
            load_settings(),
            names,
            say=lambda line: console.print(line, highlight=False),
            replicas=replicas,
        )
    except (control.StackError, StoreError) as exc:
        fail(str(exc))


@app.command()
def down() -> None:
    """Stop every service of the local stack."""
    if control.down(load_settings()):
        console.print("stack stopped")
    else:
        console.print("nothing was running")


@app.command()
def status() -> None:
    """Show each service (pid, URL, health, memory) and the effective settings."""
    settings = load_settings()
    rows = control.status(settings)
    console.print(services_table(rows))
    console.print(f"total RSS: {sum(row.rss_mb for row in rows):.0f} MB")
    for alias, (ready, total) in control.in_rotation(rows).items():
        console.print(
            literal(f"balancer: {alias} (haproxy) over {total} replicas, {ready} in rotation"),
            highlight=False,
        )
    serving = tuple(r.name for r in rows if r.name in webhooks.SERVED_ALIASES and r.healthy)
    swaps = webhooks.swap_lines(settings, serving)
    if swaps:
        shown = "; ".join(f"{alias} {how}" for alias, how in swaps.items())
        console.print(literal(f"swaps: {shown}"), highlight=False)
    urls = {r.name: r.url for r in rows if r.name in live.SERVED_ALIASES and r.healthy}
    for line in live_lines(live.summed(settings, live.read(urls))):
        console.print(line, highlight=False)
    for line in unaudited_lines(_unaudited(settings)):
        console.print(line, highlight=False)
    if settings.promotions_url:
        answers = control.healthy(f"{settings.promotions_url.rstrip('/')}/health")
        console.print(
            literal(
                f"promotion service: {mask_credentials(settings.promotions_url)} "
                f"({'answers' if answers else 'does not answer'}): promote, approve, rollback, "
                "evalset and train's staging sign there"
            ),
            highlight=False,
        )
    print_settings(console, settings.masked())


def _unaudited(settings: Settings) -> dict[str, str]:
    """The settings' model's aliases with no audit record; {} when the registry does not answer."""
    rest = TrackingRest.for_settings(settings, timeout=5.0)
    try:
        aliases, tags = rest.registered_model(settings.model_name)
    except TrackingError:
        return {}
    finally:
        rest.close()
    return unaudited_aliases(aliases, last_moves(tags))


@app.command()
def logs(
    service: str = typer.Argument(
        ...,
        help="store, tracking, production, staging, app, supervisord, or a replica "
        "(production-1, ...)",
    ),
    follow: bool = typer.Option(False, "-f", "--follow", help="keep printing new lines"),
    lines: int = typer.Option(50, "-n", "--lines", help="how many past lines to show"),
) -> None:
    """Print a service's log."""
    try:
        path = control.log_file(load_settings(), service)
        for line in control.follow(path, lines=lines, forever=follow):
            sys.stdout.write(line)
            sys.stdout.flush()
    except control.StackError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass
