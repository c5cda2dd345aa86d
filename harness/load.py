"""Open-loop HTTP load from a process of its own, for the drills and the end-to-end benchmark.

`python -m harness.load URL RATE SECONDS OUT [KIND]` posts one CAPTCHA per request to
URL/invocations (KIND `invocations`, a model server) or URL/api/predict (KIND `app`, the web app)
at RATE requests per second for SECONDS and writes every outcome to OUT. Open loop: requests go
out on schedule whether or not earlier ones were answered, so a stalled server cannot slow the
clients down.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


def captcha_body(seed: int = 11) -> dict[str, Any]:
    """A scoring request with one generated CAPTCHA."""
    from captchaops.data.synthetic import generate_one

    image = base64.b64encode(generate_one(seed).image).decode()
    return {"dataframe_split": {"columns": ["image"], "data": [[image]]}}


def _importable_env() -> dict[str, str]:
    """This environment with the repository root first on PYTHONPATH, so `-m harness.load`
    imports from any working directory (the harness is not part of the installed package)."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


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
            [sys.executable, "-m", "harness.load", *args],
            env=_importable_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        load = cls(proc, out, rate, seconds)
        deadline = time.monotonic() + 60
        while not out.with_suffix(".started").exists():
            if proc.poll() is not None:
                stderr = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"the load generator exited with {proc.returncode}: {stderr}")
            if time.monotonic() > deadline:
                load.stop()
                raise TimeoutError("the load generator did not start within 60 s")
            time.sleep(0.05)
        return load

    def finish(self) -> LoadReport:
        """Stop sending now, wait for the answers in flight and read what was recorded."""
        self.out.with_suffix(".stop").touch()
        return self.wait()

    def wait(self) -> LoadReport:
        """Wait for the run to end and read what it recorded."""
        _, stderr = self.proc.communicate(timeout=self.seconds + 120)
        if self.proc.returncode != 0:
            raise RuntimeError(f"the load generator failed: {stderr.decode()[-3000:]}")
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
