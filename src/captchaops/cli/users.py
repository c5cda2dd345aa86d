"""Team accounts on the tracking server."""

from __future__ import annotations

import sys

import typer

from captchaops import team_accounts as users
from captchaops.cli.base import app, console, fail
from captchaops.settings import load_settings

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
    """Create or refresh the service account the model servers and the web app log in with, and
    the promotion service's own account when CAPTCHAOPS_PROMOTIONS_PASSWORD is set."""
    settings = load_settings()
    try:
        accounts = [users.ensure_service_account(settings)]
        if settings.promotions_password:
            accounts.append(users.ensure_promotions_account(settings))
    except users.UsersError as exc:
        fail(str(exc))
    for account in accounts:
        console.print(f"{account.role} account {account.username} ready", highlight=False)
        for grant in account.grants:
            console.print(f"  {grant}", highlight=False)
