"""Supervision by supervisord: config file, daemon start/stop, XML-RPC over a private socket."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

import psutil
from supervisor.xmlrpc import SupervisorTransport

from captchaops.settings import Settings, refuse_control_characters, write_private
from captchaops.stack.services import Service


def run_dir(settings: Settings) -> Path:
    """Where the config, pid file and socket of the supervisor live."""
    return settings.home_dir / "run"


def log_dir(settings: Settings) -> Path:
    """Where each service's log file lives."""
    return settings.home_dir / "logs"


def socket_path(settings: Settings) -> Path:
    """The control socket (AF_UNIX paths must stay under 108 bytes)."""
    path = run_dir(settings) / "supervisor.sock"
    if len(str(path)) < 100:
        return path
    digest = hashlib.sha256(str(settings.home_dir).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"captchaops-{digest}.sock"


def rpc(settings: Settings) -> Any:
    """An XML-RPC proxy to the running supervisord (calls fail if it is not running)."""
    transport = SupervisorTransport(None, None, serverurl=f"unix://{socket_path(settings)}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def is_running(settings: Settings) -> bool:
    """True when a supervisord answers on this home's socket."""
    if not socket_path(settings).exists():
        return False
    try:
        return bool(rpc(settings).supervisor.getState()["statecode"] == 1)
    except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
        return False


def _quote(value: str) -> str:
    """A supervisord string; a value with a line break could add a section, so it is refused."""
    refuse_control_characters("a service setting", value)
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def render_config(settings: Settings, services: list[Service]) -> str:
    """The supervisord.conf text for these services."""
    run, logs = run_dir(settings), log_dir(settings)
    lines = [
        "[unix_http_server]",
        f"file={socket_path(settings)}",
        "chmod=0700",
        "",
        "[supervisord]",
        f"logfile={logs / 'supervisord.log'}",
        "logfile_maxbytes=5MB",
        "logfile_backups=2",
        f"pidfile={run / 'supervisord.pid'}",
        f"directory={settings.home_dir}",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
    ]
    for svc in services:
        env = ",".join(f"{key}={_quote(value)}" for key, value in svc.env.items())
        lines += [
            f"[program:{svc.name}]",
            "command=" + " ".join(_quote(part) for part in svc.command),
            f"directory={settings.home_dir}",
            "autostart=false",
            "autorestart=true",
            "startsecs=1",
            "startretries=20",
            "stopsignal=TERM",
            "stopwaitsecs=15",
            "stopasgroup=true",
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={logs / (svc.name + '.log')}",
            "stdout_logfile_maxbytes=10MB",
            "stdout_logfile_backups=2",
        ]
        if env:
            lines.append(f"environment={env}")
        lines.append("")
    return "\n".join(lines)


def start_daemon(settings: Settings, services: list[Service]) -> None:
    """Write the config (0600: it holds secrets) and start supervisord in the background."""
    run_dir(settings).mkdir(parents=True, exist_ok=True)
    log_dir(settings).mkdir(parents=True, exist_ok=True)
    conf = run_dir(settings) / "supervisord.conf"
    write_private(conf, render_config(settings, services))
    exe = Path(sys.executable).parent / "supervisord"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "supervisor.supervisord"]
    subprocess.run([*cmd, "-c", str(conf)], check=True, capture_output=True, timeout=30)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if is_running(settings):
            return
        time.sleep(0.1)
    raise RuntimeError(f"supervisord did not start; see {log_dir(settings) / 'supervisord.log'}")


def shutdown_daemon(settings: Settings, timeout: float = 60.0) -> None:
    """Stop every service, then supervisord itself, and wait until it is gone."""
    pidfile = run_dir(settings) / "supervisord.pid"
    pid = int(pidfile.read_text().strip()) if pidfile.exists() else None
    descendants = _descendants(pid)
    proxy = rpc(settings)
    try:
        proxy.supervisor.stopAllProcesses(True)
        proxy.supervisor.shutdown()
    except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
        pass
    deadline = time.monotonic() + timeout
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    # A service's own helpers (a model server's forkserver, decoding workers and resource
    # tracker) end a moment after it does, and a stuck one not at all: wait for them, briefly.
    _, alive = psutil.wait_procs(
        descendants, timeout=min(10.0, max(0.0, deadline - time.monotonic()))
    )
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


def _descendants(pid: int | None) -> list[psutil.Process]:
    """Every process started under supervisord (services and whatever they started)."""
    if pid is None:
        return []
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def process_info(settings: Settings) -> dict[str, dict[str, Any]]:
    """supervisord's view of each program, by name (empty when it is not running)."""
    try:
        return {info["name"]: info for info in rpc(settings).supervisor.getAllProcessInfo()}
    except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
        return {}
