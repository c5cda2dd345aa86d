"""The serving benchmarks' load generator: keep-alive clients POSTing one body to /invocations.

It runs in a process of its own (`run_load`), so its work does not share the benchmark's GIL.

Usage: python -m benchmarks.serving_load URL CONCURRENCY SECONDS BODY_FILE   # prints JSON
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    """What one load-generator run measured."""

    concurrency: int
    seconds: float
    ok: int
    failed: int
    rps: float
    p50_ms: float
    p99_ms: float
    versions: list[tuple[float, str]]


def generate_load(url: str, concurrency: int, seconds: float, body: bytes) -> dict[str, object]:
    """POST `body` to url/invocations from `concurrency` keep-alive connections for `seconds`."""
    parts = urlsplit(url)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    failures = [0] * concurrency
    versions: list[list[tuple[float, str]]] = [[] for _ in range(concurrency)]
    start = time.monotonic()
    deadline = start + seconds
    headers = {"Content-Type": "application/json"}

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        last_version = ""
        while time.monotonic() < deadline:
            sent = time.perf_counter()
            try:
                conn.request("POST", "/invocations", body=body, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
                ok = resp.status == 200 and payload.startswith(b'{"predictions"')
                version = resp.getheader("X-Model-Version") or ""
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
                ok, version = False, ""
            if ok:
                latencies[i].append(time.perf_counter() - sent)
                if version != last_version:
                    versions[i].append((time.time(), version))
                    last_version = version
            else:
                failures[i] += 1
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    flat = sorted(x for per in latencies for x in per)
    return {
        "concurrency": concurrency,
        "seconds": elapsed,
        "ok": len(flat),
        "failed": sum(failures),
        "rps": len(flat) / elapsed,
        "p50_ms": _quantile(flat, 0.50) * 1000,
        "p99_ms": _quantile(flat, 0.99) * 1000,
        "versions": sorted(v for per in versions for v in per),
    }


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def run_load(
    url: str,
    concurrency: int,
    seconds: float,
    body_file: Path,
    where: Callable[[list[str]], list[str]] = list,
) -> LoadResult:
    """Run the load generator in a separate process (its command line made by `where`, e.g.
    `harness.hosts.Host.command`: on another host) and read its result."""
    out = subprocess.run(
        where(
            [
                sys.executable,
                "-m",
                "benchmarks.serving_load",
                url,
                str(concurrency),
                str(seconds),
                str(body_file),
            ]
        ),
        check=True,
        capture_output=True,
        text=True,
    )
    data = json.loads(out.stdout)
    data["versions"] = [tuple(v) for v in data["versions"]]
    return LoadResult(**data)


if __name__ == "__main__":
    url, concurrency, seconds, body_file = sys.argv[1:5]
    print(
        json.dumps(
            generate_load(url, int(concurrency), float(seconds), Path(body_file).read_bytes())
        )
    )
