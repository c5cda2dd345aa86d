"""What the end-to-end drills share: a private stack driven by the real CLI, and load from another process.

`python -m tests.e2e.drills URL RATE SECONDS OUT [KIND]` is the load generator: it posts one CAPTCHA
per request to URL/invocations (KIND `invocations`, a model server) or URL/api/predict (KIND `app`,
the web app) at RATE requests per second for SECONDS and writes every outcome to OUT.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.fixtures.stack import VENV_BIN, free_port

CLI = str(VENV_BIN / "captchaops")
SERVICES = ("tracking", "production", "staging", "app")
PORTS = {
    "tracking": "CAPTCHAOPS_TRACKING_PORT",
    "production": "CAPTCHAOPS_PRODUCTION_PORT",
    "staging": "CAPTCHAOPS_STAGING_PORT",
    "app": "CAPTCHAOPS_APP_PORT",
}
HEALTH = {"tracking": "/health", "production": "/ping", "staging": "/ping", "app": "/healthz"}


def stack_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment for a private stack: its own home, free ports, no inherited credentials."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("CAPTCHAOPS_", "AWS_", "MLFLOW_"))
    }
    env.update({setting: str(free_port()) for setting in PORTS.values()})
    env.update(CAPTCHAOPS_HOME=str(home), CAPTCHAOPS_POLL_SECONDS="0.5", **extra)
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
        """`captchaops up`; fails the test with the CLI's output if it does not succeed."""
        result = self.cli("up")
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    def down(self) -> None:
        """`captchaops down`."""
        self.cli("down")

    def settings(self) -> Any:
        """The Settings object the stack's own processes see."""
        from captchaops.settings import load_settings

        overrides: dict[str, object] = {
            "home": self.home,
            "tracking_uri": None,
            "staging_floor": float(self.env.get("CAPTCHAOPS_STAGING_FLOOR", "0.5")),
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
        rows = {name: tree_rss_mb(pid) for name, pid in self.pids().items()}
        pidfile = self.home / "run" / "supervisord.pid"
        if pidfile.exists():
            with suppress(psutil.Error, ValueError):
                rows["supervisord"] = (
                    psutil.Process(int(pidfile.read_text())).memory_info().rss / 1e6
                )
        return rows

    def served_version(self, alias: str) -> str | None:
        """The version the model server for an alias says it serves."""
        try:
            answer = httpx.get(f"{self.url(alias)}/version", timeout=3)
        except httpx.HTTPError:
            return None
        return str(answer.json().get("version")) if answer.status_code == 200 else None

    def wait_version(self, alias: str, version: str, timeout: float = 90) -> float:
        """Seconds until the alias's server serves `version`; fails the test after timeout."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.served_version(alias) == version:
                return time.monotonic() - started
            time.sleep(0.1)
        log = (self.home / "logs" / f"{alias}.log").read_text()[-3000:]
        raise AssertionError(f"{alias} never served v{version} within {timeout}s:\n{log}")

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


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and its children, in MB (0 when it is gone)."""
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 1e6
    except psutil.Error:
        return 0.0


def integrity(db: Path) -> str:
    """SQLite's own verdict on a database file ("ok" when intact), opened read-only."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


@contextmanager
def mlflow_uris_restored() -> Iterator[None]:
    """Undo the global tracking/registry URI (and the env vars) MLflow clients set in this process."""
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils
    from pytest import MonkeyPatch

    with MonkeyPatch.context() as mp:
        mp.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
        mp.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            if var in os.environ:
                mp.setenv(var, os.environ[var])
            else:
                mp.delenv(var, raising=False)
        yield


def captcha_body(seed: int = 11) -> dict[str, Any]:
    """A scoring request with one generated CAPTCHA."""
    from captchaops.data.synthetic import generate_one

    image = base64.b64encode(generate_one(seed).image).decode()
    return {"dataframe_split": {"columns": ["image"], "data": [[image]]}}


@dataclass
class LoadReport:
    """Every request a load run sent: when (wall clock), the outcome and the serving version."""

    records: list[dict[str, Any]]
    rate: float
    seconds: float

    @property
    def sent(self) -> int:
        """Requests sent."""
        return len(self.records)

    def failures(self, start: float = 0.0, end: float = float("inf")) -> list[dict[str, Any]]:
        """Requests that did not get a 200, sent within [start, end)."""
        return [r for r in self.records if r["status"] != 200 and start <= r["t"] < end]

    def degraded(self) -> list[dict[str, Any]]:
        """Web app answers (200) that reported production unavailable."""
        return [r for r in self.records if r["status"] == 200 and r["error"]]

    @property
    def versions(self) -> Counter[str]:
        """How many answers each model version gave."""
        return Counter(r["version"] for r in self.records if r["status"] == 200)

    def latency_ms(self, q: float) -> float:
        """A latency quantile of the successful requests."""
        values = sorted(r["ms"] for r in self.records if r["status"] == 200)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    def summary(self) -> str:
        """One line for logs and reports."""
        errors = Counter(str(r["error"] or r["status"]) for r in self.failures())
        return (
            f"{self.sent} requests at {self.rate:g}/s for {self.seconds:g}s: "
            f"{len(self.failures())} failed {dict(errors)}, versions {dict(self.versions)}, "
            f"p50 {self.latency_ms(0.5):.0f} ms, p99 {self.latency_ms(0.99):.0f} ms"
        )


@dataclass
class Load:
    """A load generator running in its own process."""

    proc: subprocess.Popen[bytes]
    out: Path
    rate: float
    seconds: float
    started: float = field(default_factory=time.time)

    @classmethod
    def start(
        cls, url: str, rate: float, seconds: float, out: Path, kind: str = "invocations"
    ) -> Load:
        """Start posting to a model server (or the web app, kind `app`) at `rate`/s for `seconds`."""
        args = [url, str(rate), str(seconds), str(out), kind]
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.drills", *args],
            cwd=Path(__file__).resolve().parents[2],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        load = cls(proc, out, rate, seconds)
        deadline = time.monotonic() + 60
        while not out.with_suffix(".started").exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "load generator did not start"
            time.sleep(0.05)
        return load

    def finish(self) -> LoadReport:
        """Stop sending now, wait for the answers in flight and read what was recorded."""
        self.out.with_suffix(".stop").touch()
        return self.wait()

    def wait(self) -> LoadReport:
        """Wait for the run to end and read what it recorded."""
        _, stderr = self.proc.communicate(timeout=self.seconds + 120)
        assert self.proc.returncode == 0, stderr.decode()[-3000:]
        return LoadReport(json.loads(self.out.read_text()), self.rate, self.seconds)

    def stop(self) -> None:
        """Kill the generator (teardown after a failed test)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def run_load(url: str, rate: float, seconds: float, out: Path, kind: str = "invocations") -> None:
    """Post one CAPTCHA per request at a fixed rate; write every outcome to out.

    Kind `invocations` posts a scoring request to url/invocations; kind `app` posts
    `{"image": ...}` to the web app's url/api/predict, where the version is production's
    and `error` says when production was reported unavailable in a 200 answer.

    Sending stops early when a file named like out with the suffix `.stop` appears.
    """
    scoring = captcha_body()
    if kind == "app":
        path, body = "/api/predict", json.dumps({"image": scoring["dataframe_split"]["data"][0][0]})
    else:
        path, body = "/invocations", json.dumps(scoring)
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
    with httpx.Client(limits=limits, timeout=10) as http:
        http.get(url + ("/healthz" if kind == "app" else "/ping"))

        def one(t: float) -> None:
            started = time.perf_counter()
            status, version, error = 0, None, None
            try:
                answer = http.post(
                    url + path, content=body, headers={"Content-Type": "application/json"}
                )
                status, version = answer.status_code, answer.headers.get("X-Model-Version")
                if status != 200:
                    error = answer.text[:200]
                elif kind == "app":
                    production = answer.json()["environments"]["production"]
                    version = (production.get("model") or {}).get("version")
                    error = production.get("error")
            except httpx.HTTPError as exc:
                error = type(exc).__name__
            ms = (time.perf_counter() - started) * 1000
            with lock:
                records.append(
                    {"t": t, "status": status, "version": version, "error": error, "ms": ms}
                )

        out.with_suffix(".started").write_text(str(time.time()))
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=48) as pool:
            stop = out.with_suffix(".stop")
            for i in range(int(rate * seconds)):
                if i % max(1, int(rate / 10)) == 0 and stop.exists():
                    break
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(one, time.time())
    records.sort(key=lambda r: r["t"])
    out.write_text(json.dumps(records))


if __name__ == "__main__":
    run_load(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4]), *sys.argv[5:])
