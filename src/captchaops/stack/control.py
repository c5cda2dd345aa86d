"""`up`, `down`, `status`, `logs`: the local stack as one unit."""

from __future__ import annotations

import contextlib
import errno
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from captchaops.settings import Settings, client_host_for
from captchaops.stack import supervisor, webhooks
from captchaops.stack.memory import rss_mb
from captchaops.stack.services import ALL, Service, build_services, team_secrets
from captchaops.stack.store import Store, choose_store, ensure_bucket


class StackError(Exception):
    """The stack could not be brought to the requested state; the message says how to fix it."""


@dataclass(frozen=True)
class ServiceStatus:
    """One row of `captchaops status`."""

    name: str
    pid: int | None
    state: str
    url: str
    healthy: bool
    rss_mb: float


def port_in_use(host: str, port: int) -> bool:
    """True when something accepts connections on host:port."""
    target = client_host_for(host)
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((target, port)) == 0


def healthy(url: str, timeout: float = 2.0) -> bool:
    """True when GET url answers 200."""
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def resolve(settings: Settings) -> tuple[Store, Settings, list[Service]]:
    """The chosen store, settings with generated secrets, and every service spec."""
    store, settings = choose_store(settings)
    if settings.auth:
        settings = team_secrets(settings)
    return store, settings, build_services(settings, store, ALL)


def up(
    settings: Settings,
    names: tuple[str, ...] = ALL,
    say: Callable[[str], None] = print,
) -> list[Service]:
    """Start the requested services in order and wait until each is healthy."""
    try:
        return _up(settings, names, say)
    except ValueError as exc:  # a setting with a line break, refused before it reaches a file
        raise StackError(str(exc)) from exc
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.ENOSPC, errno.EDQUOT):
            raise
        raise StackError(
            f"cannot write to the home {settings.home_dir} ({exc.strerror}); free space there "
            "or set CAPTCHAOPS_HOME to a writable folder"
        ) from exc


def _up(settings: Settings, names: tuple[str, ...], say: Callable[[str], None]) -> list[Service]:
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    settings.home_dir.chmod(0o700)  # secrets, the sqlite database and logs live here
    if settings.webhooks:
        settings = webhooks.ensure_secrets(settings)
    store, settings, services = resolve(settings)
    say(store.describe(settings))
    running_before = supervisor.is_running(settings)
    info = supervisor.process_info(settings) if running_before else {}
    wanted = [svc for svc in services if svc.name in names]
    # STARTING too: supervisord says RUNNING only `startsecs` after the start, while the service
    # may already answer (a second `up` right after the first found its own app's port "in use")
    already = [
        svc for svc in wanted if info.get(svc.name, {}).get("statename") in ("RUNNING", "STARTING")
    ]
    todo = [svc for svc in wanted if svc not in already]
    if already:
        say("already running: " + ", ".join(f"{svc.name} ({svc.url})" for svc in already))
    for svc in todo:
        if port_in_use(settings.host, svc.port):
            raise StackError(
                f"port {svc.port} ({svc.name}) is in use by another process; "
                f"set {svc.port_setting} to a free port"
            )
    if store.kind == "s3" and ensure_bucket(store, settings):
        say(f"created bucket {settings.s3_bucket}")
    if not todo:
        _register_webhooks(settings, wanted, say)
        return wanted
    if not running_before:
        supervisor.start_daemon(settings, services)
    started: list[str] = []
    try:
        for svc in todo:
            supervisor.rpc(settings).supervisor.startProcess(svc.name, False)
            started.append(svc.name)
            _wait_healthy(settings, svc)
            if svc.name == "store" and ensure_bucket(store, settings):
                say(f"created bucket {settings.s3_bucket}")
            if svc.name == "tracking" and settings.auth:
                from captchaops import team_accounts as users

                users.ensure_service_account(settings)
            say(f"{svc.name:<11} healthy  {svc.url}")
    except BaseException:
        _undo(settings, started, stop_daemon=not running_before)
        raise
    _register_webhooks(settings, wanted, say)
    return wanted


def _register_webhooks(
    settings: Settings, wanted: list[Service], say: Callable[[str], None]
) -> None:
    """Point an alias webhook at each model server `up` runs (created once, then updated)."""
    aliases = tuple(svc.name for svc in wanted if svc.name in webhooks.SERVED_ALIASES)
    webhooks.report(webhooks.register(settings, aliases), settings, say)


def _wait_healthy(settings: Settings, svc: Service) -> None:
    deadline = time.monotonic() + svc.start_timeout
    log = supervisor.log_dir(settings) / f"{svc.name}.log"
    while time.monotonic() < deadline:
        if healthy(svc.health_url):
            return
        state = supervisor.process_info(settings).get(svc.name, {}).get("statename")
        if state == "FATAL":
            raise StackError(f"{svc.name} could not start; see {log} (captchaops logs {svc.name})")
        time.sleep(0.25)
    raise StackError(
        f"{svc.name} not healthy after {svc.start_timeout:.0f}s; see {log} "
        f"(captchaops logs {svc.name})"
    )


def _undo(settings: Settings, started: list[str], stop_daemon: bool) -> None:
    """Leave nothing half-started behind after a failed `up`."""
    if stop_daemon:
        supervisor.shutdown_daemon(settings)
        return
    for name in reversed(started):
        with contextlib.suppress(Exception):
            supervisor.rpc(settings).supervisor.stopProcess(name, True)


def down(settings: Settings) -> bool:
    """Stop every service and the supervisor; False when nothing was running."""
    if not supervisor.is_running(settings):
        return False
    supervisor.shutdown_daemon(settings)
    return True


def status(settings: Settings) -> list[ServiceStatus]:
    """The state, health and memory of every service of this home."""
    _, settings, services = resolve(settings)
    info = supervisor.process_info(settings)
    rows = []
    for svc in services:
        proc = info.get(svc.name, {})
        pid = int(proc.get("pid") or 0) or None
        state = str(proc.get("statename", "STOPPED" if info else "DOWN"))
        is_healthy = state == "RUNNING" and healthy(svc.health_url)
        rows.append(ServiceStatus(svc.name, pid, state, svc.url, is_healthy, rss_mb(pid)))
    return rows


def log_file(settings: Settings, name: str) -> Path:
    """The log file of a service (or of the supervisor itself)."""
    names = {*ALL, "supervisord"}
    if name not in names:
        raise StackError(f"unknown service {name!r}; choose one of: {', '.join(sorted(names))}")
    return supervisor.log_dir(settings) / f"{name}.log"


def follow(path: Path, lines: int = 50, forever: bool = False) -> Iterator[str]:
    """The last lines of a log file, then new lines as they arrive when forever is set."""
    if not path.exists():
        raise StackError(f"no log yet at {path}; start the stack with `captchaops up`")
    with path.open("r", errors="replace") as fh:
        yield from fh.readlines()[-lines:]
        while forever:
            line = fh.readline()
            if line:
                yield line
            else:
                time.sleep(0.3)
