"""`up`, `down`, `status`, `logs`: the local stack as one unit."""

from __future__ import annotations

import contextlib
import errno
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from captchaops import team_accounts as users
from captchaops.settings import Settings, client_host_for, write_env, write_private
from captchaops.stack import balancer, supervisor, webhooks
from captchaops.stack.memory import rss_mb
from captchaops.stack.services import ALL, Service, build_services, replica_name, team_secrets
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


def stack_plan(settings: Settings, replicas: int = 1) -> tuple[Store, Settings, list[Service]]:
    """The chosen store, settings with generated secrets, and every service spec."""
    store, settings = choose_store(settings)
    if settings.auth:
        settings = team_secrets(settings)
    return store, settings, build_services(settings, store, ALL, replicas)


def replicas_running(info: dict[str, dict[str, object]]) -> int:
    """How many replicas per alias the running supervisor was started with (1: no balancer)."""
    counts = [
        sum(replica_name(alias, k) in info for k in range(1, balancer.MAX_REPLICAS + 1))
        for alias in webhooks.SERVED_ALIASES
    ]
    return max(counts) or 1


def replicas_conflict(info: dict[str, dict[str, object]], replicas: int) -> int | None:
    """The replica count the running supervisor serves its aliases with, where it differs from
    `replicas`; None where it agrees or serves no alias yet (`up --core` first, then
    `up --replicas N`, starts the servers with N)."""
    serving = any(_base_name(name) in webhooks.SERVED_ALIASES for name in info)
    running = replicas_running(info)
    return running if serving and running != replicas else None


def in_rotation(rows: list[ServiceStatus]) -> dict[str, tuple[int, int]]:
    """For `status`, per alias served by replicas: how many of them are in the balancer's
    rotation (their /health answers 200: a version is loaded), and how many there are."""
    out: dict[str, tuple[int, int]] = {}
    for row in rows:
        alias = _base_name(row.name)
        if alias == row.name:
            continue
        ready = row.healthy and healthy(row.url + "/health")
        done, total = out.get(alias, (0, 0))
        out[alias] = (done + ready, total + 1)
    return out


def up(
    settings: Settings,
    names: tuple[str, ...] = ALL,
    say: Callable[[str], None] = print,
    replicas: int | None = None,
) -> list[Service]:
    """Start the requested services in order and wait until each is healthy; with `replicas`
    > 1, each served alias runs as that many model servers behind a balancer (HAProxy). None:
    as many as the running stack has (1 when none runs)."""
    if replicas is None:
        replicas = replicas_running(supervisor.process_info(settings))
    if not 1 <= replicas <= balancer.MAX_REPLICAS:
        raise StackError(f"--replicas must be between 1 and {balancer.MAX_REPLICAS}")
    if replicas > 1 and set(names) & set(webhooks.SERVED_ALIASES):
        try:
            balancer.haproxy_binary()
        except balancer.BalancerMissing as exc:
            raise StackError(str(exc)) from exc
    try:
        return _up(settings, names, say, replicas)
    except ValueError as exc:  # a setting with a line break, refused before it reaches a file
        raise StackError(str(exc)) from exc
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.ENOSPC, errno.EDQUOT):
            raise
        raise StackError(
            f"cannot write to the home {settings.home_dir} ({exc.strerror}); free space there "
            "or set CAPTCHAOPS_HOME to a writable folder"
        ) from exc


def _up(
    settings: Settings, names: tuple[str, ...], say: Callable[[str], None], replicas: int
) -> list[Service]:
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    settings.home_dir.chmod(0o700)  # secrets, the sqlite database and logs live here
    if settings.webhooks:
        settings = webhooks.ensure_secrets(settings)
    store, settings, services = stack_plan(settings, replicas)
    say(store.describe(settings))
    running_before = supervisor.is_running(settings)
    info = supervisor.process_info(settings) if running_before else {}
    running = replicas_conflict(info, replicas) if running_before else None
    if running is not None:
        raise StackError(
            f"the stack runs with {running} replica(s) per alias, not {replicas}; "
            "stop it first (captchaops down) to change --replicas"
        )
    wanted = [svc for svc in services if _base_name(svc.name) in names]
    # STARTING too: supervisord says RUNNING only `startsecs` after the start, while the service
    # may already answer (a second `up` right after the first found its own app's port "in use")
    already = [
        svc for svc in wanted if info.get(svc.name, {}).get("statename") in ("RUNNING", "STARTING")
    ]
    todo = [svc for svc in wanted if svc not in already]
    if already:
        say("already running: " + ", ".join(f"{svc.name} ({svc.url})" for svc in already))
    for svc in todo:
        if port_in_use(urlsplit(svc.url).hostname or settings.host, svc.port):
            raise StackError(
                f"port {svc.port} ({svc.name}) is in use by another process; "
                f"set {svc.port_setting} to a free port"
                + (
                    f" (its replicas use it + {balancer.REPLICA_PORT_STEP} x 1..{replicas})"
                    if replicas > 1 and svc.name != _base_name(svc.name)
                    else ""
                )
            )
    for svc in todo:
        for path, text in svc.files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_private(path, text)
        for folder in svc.folders:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for link, target in svc.links.items():
            _link(link, target)
    if store.kind == "s3" and ensure_bucket(store, settings):
        say(f"created bucket {settings.s3_bucket}")
    if not todo:
        _register_webhooks(settings, wanted, say)
        _publish_promotions(settings, wanted, say)
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
                users.ensure_service_account(settings)
                users.ensure_promotions_account(settings)
            say(f"{svc.name:<11} healthy  {svc.url}")
    except BaseException:
        _undo(settings, started, stop_daemon=not running_before)
        raise
    _register_webhooks(settings, wanted, say)
    _publish_promotions(settings, wanted, say)
    return wanted


PROMOTIONS_URL = "CAPTCHAOPS_PROMOTIONS_URL"


def _publish_promotions(
    settings: Settings, wanted: list[Service], say: Callable[[str], None]
) -> None:
    """Name the running promotion service in the home's .env, so commands run with this home
    send their signing work to it (an explicit CAPTCHAOPS_PROMOTIONS_URL still wins)."""
    found = next((svc for svc in wanted if svc.name == "promotions"), None)
    if found is None:
        return
    write_env(settings.env_file, {PROMOTIONS_URL: found.url})
    say(f"promotions: commands with this home sign through {found.url} ({settings.env_file})")


def _forget_promotions(settings: Settings) -> None:
    """Take out of the home's .env the promotion service URL `up` wrote (this stack's own port),
    so no command sends work to a stopped service; a URL someone else wrote stays."""
    path = settings.env_file
    if not path.is_file():
        return
    ours = f"{PROMOTIONS_URL}=http://{client_host_for(settings.host)}:{settings.promotions_port}"
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() != ours]
    if kept != lines:
        write_private(path, "".join(f"{line}\n" for line in kept))


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
    _forget_promotions(settings)
    return True


def _link(link: Path, target: Path) -> None:
    """`link` -> `target`, made or replaced."""
    link.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if link.is_symlink() and link.readlink() == target:
        return
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    link.symlink_to(target)


def _base_name(name: str) -> str:
    """The service a replica belongs to (`production-2` -> `production`), else the name."""
    alias, _, index = name.rpartition("-")
    return alias if alias in webhooks.SERVED_ALIASES and index.isdigit() else name


def status(settings: Settings) -> list[ServiceStatus]:
    """The state, health and memory of every service of this home (each replica of an alias
    and its balancer, under the alias's name, when `up --replicas` started them)."""
    info = supervisor.process_info(settings)
    _, settings, services = stack_plan(settings, replicas_running(info))
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
    if _base_name(name) not in names:
        raise StackError(
            f"unknown service {name!r}; choose one of: {', '.join(sorted(names))} "
            "(or a replica: production-1, ...)"
        )
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
