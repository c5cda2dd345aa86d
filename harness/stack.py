"""A whole private stack driven through the CLI, and what the drills do to its disk and registry.

Used by the end-to-end tests (tests/e2e) and the end-to-end benchmark (benchmarks/bench_e2e.py):
a stack in its own home on free ports (`PrivateStack`), a tmpfs to fill up or make read-only,
SQLite's integrity check, and a snapshot of everything the tracking server must keep.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from captchaops.settings import Settings
from harness.processes import VENV_BIN, free_port, rss_mb

CLI = str(VENV_BIN / "captchaops")
SERVICES = ("tracking", "production", "staging", "app")
PORTS = {
    "tracking": "CAPTCHAOPS_TRACKING_PORT",
    "production": "CAPTCHAOPS_PRODUCTION_PORT",
    "staging": "CAPTCHAOPS_STAGING_PORT",
    "app": "CAPTCHAOPS_APP_PORT",
    "promotions": "CAPTCHAOPS_PROMOTIONS_PORT",  # team mode only
}
HEALTH = {
    "tracking": "/health",
    "production": "/ping",
    "staging": "/ping",
    "app": "/healthz",
    "promotions": "/health",
}
SIGNING_KEY_ENV = "CAPTCHAOPS_SIGNING_KEY_DIR"
"""Where the promotion key lives: model servers follow only alias moves it signed."""


def share_signing_key(work: Path) -> Path:
    """Make this process and every process it starts from now on sign and verify alias moves
    with one promotion key: the environment's folder if it names one, else one under `work`.

    For benchmarks that move aliases in-process (the registry writer reads the environment's
    settings) while their servers run with homes of their own.
    """
    folder = os.environ.get(SIGNING_KEY_ENV) or str(work / "promotion-keys")
    os.environ[SIGNING_KEY_ENV] = folder
    return Path(folder)


def stack_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment for a private stack: its own home, free ports, no inherited credentials.

    The promotion key is the one this process names (SIGNING_KEY_ENV), else the home's, so
    alias moves made in-process (`PrivateStack.settings`) are ones the stack's servers follow.
    """
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("CAPTCHAOPS_", "AWS_", "MLFLOW_"))
    }
    env.update({setting: str(free_port()) for setting in PORTS.values()})
    keys = os.environ.get(SIGNING_KEY_ENV) or str(home / "promotion-keys")
    env.update(CAPTCHAOPS_HOME=str(home), CAPTCHAOPS_POLL_SECONDS="0.5", **extra)
    env.setdefault(SIGNING_KEY_ENV, keys)
    return env


@dataclass
class PrivateStack:
    """A whole captchaops stack in its own home on free ports, driven through the CLI."""

    home: Path
    env: dict[str, str]

    @classmethod
    def create(cls, home: Path, **extra: str) -> PrivateStack:
        """A stack description for this home (nothing starts until `up`)."""
        home.mkdir(parents=True, exist_ok=True)
        return cls(home, stack_env(home, **extra))

    def cli(
        self, *args: str, timeout: float = 240, extra: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `captchaops ARGS` as a user would, in this stack's environment (plus `extra`)."""
        return subprocess.run(
            [CLI, *args],
            env={**self.env, **(extra or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def up(self) -> subprocess.CompletedProcess[str]:
        """`captchaops up`; raises with the CLI's output if it does not succeed."""
        result = self.cli("up")
        if result.returncode != 0:
            raise RuntimeError(f"captchaops up failed: {result.stdout}{result.stderr}")
        return result

    def down(self) -> None:
        """`captchaops down`."""
        self.cli("down")

    def settings(self) -> Settings:
        """The Settings object the stack's own processes see."""
        from captchaops.settings import load_settings

        overrides: dict[str, object] = {
            "home": self.home,
            "tracking_uri": None,
            "staging_floor": float(self.env.get("CAPTCHAOPS_STAGING_FLOOR", "0.5")),
            "signing_key_dir": Path(self.env[SIGNING_KEY_ENV]),
            "signing_public_key": None,
        }
        for name, setting in PORTS.items():
            overrides[f"{name}_port"] = int(self.env[setting])
        return load_settings(**overrides)

    def port(self, service: str) -> int:
        """The port a service listens on."""
        return int(self.env[PORTS[service]])

    def url(self, service: str) -> str:
        """Base URL of a service."""
        return f"http://127.0.0.1:{self.port(service)}"

    def healthy(self, service: str) -> bool:
        """Whether the service answers its health check."""
        try:
            return httpx.get(self.url(service) + HEALTH[service], timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def pids(self) -> dict[str, int]:
        """The pid supervisord reports for each running service."""
        from captchaops.stack import supervisor

        info = supervisor.process_info(self.settings())
        return {name: int(p["pid"]) for name, p in info.items() if int(p.get("pid") or 0)}

    def rss_mb(self) -> dict[str, float]:
        """Resident memory of each service (its whole process tree) and of supervisord, in MB."""
        rows = {name: rss_mb(pid) for name, pid in self.pids().items()}
        pidfile = self.home / "run" / "supervisord.pid"
        with suppress(OSError, ValueError):
            rows["supervisord"] = rss_mb(int(pidfile.read_text()), children=False)
        return rows

    def served_version(self, alias: str) -> str | None:
        """The version the model server for an alias says it serves."""
        try:
            answer = httpx.get(f"{self.url(alias)}/version", timeout=3)
        except httpx.HTTPError:
            return None
        return str(answer.json().get("version")) if answer.status_code == 200 else None

    def wait_version(self, alias: str, version: str, timeout: float = 90) -> float:
        """Seconds until the alias's server serves `version`; TimeoutError (with the server's
        log) after `timeout`."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.served_version(alias) == version:
                return time.monotonic() - started
            time.sleep(0.1)
        log = (self.home / "logs" / f"{alias}.log").read_text()[-3000:]
        raise TimeoutError(f"{alias} never served v{version} within {timeout}s:\n{log}")

    def leftovers(self) -> list[str]:
        """Processes tied to this stack (home or port in command line or environment), but ours.

        supervisord daemonizes, so the stack's processes are never children of this process;
        the test's own helpers (e.g. multiprocessing's resource tracker) are, and are skipped.
        """
        needles = [str(self.home), *(f"--port {self.port(s)}" for s in SERVICES)]
        ports = {self.port(s) for s in SERVICES}
        ours = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
        found = []
        for proc in psutil.process_iter(["pid", "cmdline", "environ"]):
            if proc.info["pid"] in ours:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            environ = proc.info["environ"] or {}
            if (
                any(n in cmdline for n in needles)
                or environ.get("CAPTCHAOPS_HOME") == str(self.home)
                or any(environ.get(s) == str(self.port(n)) for n, s in PORTS.items())
            ):
                found.append(f"{proc.info['pid']}: {cmdline[:200]}")
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port in ports:
                found.append(f"listener on port {conn.laddr.port} (pid {conn.pid})")
        return found


def integrity(db: Path) -> str:
    """SQLite's own verdict on a database file ("ok" when intact), opened read-only."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def mount_tmpfs(path: Path, size: str, read_only: bool = False) -> bool:
    """Mount a fresh tmpfs at path; False when this machine does not allow it (not root, no caps)."""
    options = f"size={size},mode=0755" + (",ro" if read_only else "")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "captchaops-drill", str(path)],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


def unmount(path: Path) -> None:
    """Unmount a drill filesystem (lazily, should anything still hold it)."""
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(folder: Path) -> Path:
    """Write a file into folder until its filesystem has no byte left; returns the file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1):
            chunk = b"\0" * size
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return filler


def copy_version(tracking_uri: str, name: str, version: str) -> str:
    """Register a version's artifacts again as a new version of `name`; returns its number."""
    from mlflow import MlflowClient

    from captchaops.registry import versions

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    return versions.copy_version(client, name, version)


def snapshot(settings: Settings) -> dict[str, Any]:
    """Everything the tracking server holds that must survive a restart: experiments, runs,
    versions with their tags, aliases and the audit trail. Monitoring runs are left out: the
    running model servers keep adding to them (and finish and reopen them as they stop and
    start), so two snapshots of a healthy stack would differ by them."""
    from mlflow import MlflowClient

    from captchaops.live import monitoring
    from captchaops.registry.audit import history

    uri = settings.effective_tracking_uri
    client = MlflowClient(uri, registry_uri=uri)
    experiments = [e for e in client.search_experiments() if not e.name.endswith(monitoring.SUFFIX)]
    runs = client.search_runs([e.experiment_id for e in experiments], max_results=5000)
    model = client.get_registered_model(settings.model_name)
    versions = client.search_model_versions(f"name='{settings.model_name}'")
    return {
        "experiments": sorted((e.experiment_id, e.name) for e in experiments),
        "runs": sorted(
            (
                r.info.run_id,
                r.info.status,
                sorted(r.data.params.items()),
                sorted(r.data.metrics.items()),
            )
            for r in runs
        ),
        "versions": sorted((v.version, v.run_id, sorted(v.tags.items())) for v in versions),
        "aliases": dict(model.aliases),
        "audit": [m.line() for m in history(settings)],
    }
