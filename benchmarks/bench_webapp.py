"""Web app benchmark: how long a page and a prediction take while a model server hangs.

Usage:
  python -m benchmarks webapp                        # via `make bench`
  python -m benchmarks.bench_webapp [--timeout 0.5] [--requests 10]

`captchaops app` runs as `captchaops up` starts it (waitress), with the model-server timeout
set to TIMEOUT. Staging is a socket that accepts connections and never answers; production is
a port nobody listens on, then a second silent socket; the tracking server is down. Each
environment is asked in parallel, so a hanging one must cost at most the timeout: the target
is an answer within TIMEOUT + 1 s for the home page (`/version` of each environment) and for
`/api/predict` (one image to each). No model is needed: nothing answers.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from benchmarks import record
from captchaops.data.synthetic import generate_one
from harness.processes import VENV_BIN, free_port, http_service

MARGIN_S = 1.0


def _silent(stack: ExitStack) -> int:
    """A port that accepts connections (the kernel's backlog) but never answers."""
    sock = stack.enter_context(socket.socket())
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    return int(sock.getsockname()[1])


def _timed(send: Callable[[], httpx.Response], requests: int) -> tuple[list[float], set[int]]:
    seconds, statuses = [], set()
    for _ in range(requests):
        started = time.perf_counter()
        answer = send()
        seconds.append(time.perf_counter() - started)
        statuses.add(answer.status_code)
    return seconds, statuses


def _scenario(production: int, staging: int, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="bench-webapp-") as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPTCHAOPS_", "MLFLOW_"))}
        env.update(
            CAPTCHAOPS_HOME=home,
            CAPTCHAOPS_TRACKING_URI=f"http://127.0.0.1:{free_port()}",
            CAPTCHAOPS_PRODUCTION_PORT=str(production),
            CAPTCHAOPS_STAGING_PORT=str(staging),
            CAPTCHAOPS_MODEL_TIMEOUT_SECONDS=str(args.timeout),
        )
        cmd = [str(VENV_BIN / "captchaops"), "app", "--port", str(port)]
        image = base64.b64encode(generate_one(3).image).decode()
        with (
            http_service(cmd, f"{url}/healthz", env=env, log=Path(home) / "app.log"),
            httpx.Client(timeout=60) as http,
        ):
            http.get(url + "/")  # templates and clients warmed up
            page, page_status = _timed(lambda: http.get(url + "/"), args.requests)
            api, api_status = _timed(
                lambda: http.post(url + "/api/predict", json={"image": image}), args.requests
            )
    return {
        "page_median_s": statistics.median(page),
        "page_max_s": max(page),
        "page_status": sorted(page_status),
        "api_median_s": statistics.median(api),
        "api_max_s": max(api),
        "api_status": sorted(api_status),
    }


def main(argv: list[str] | None = None) -> None:
    """Time the page and /api/predict with hanging model servers; print them against the target."""
    parser = argparse.ArgumentParser(prog="bench_webapp")
    parser.add_argument("--timeout", type=float, default=0.5, help="model-server timeout (s)")
    parser.add_argument("--requests", type=int, default=10, help="requests per measurement")
    args = parser.parse_args(argv or [])
    target = args.timeout + MARGIN_S
    results: dict[str, dict[str, Any]] = {}
    with ExitStack() as sockets:
        staging = _silent(sockets)
        results["staging hangs, production down"] = _scenario(free_port(), staging, args)
        results["both hang"] = _scenario(_silent(sockets), staging, args)
    print(f"model-server timeout {args.timeout:g} s; target: every answer within {target:g} s")
    print(f"{'scenario':34} {'page median/max':>18} {'/api/predict median/max':>26}")
    met = True
    for name, r in results.items():
        worst = max(r["page_max_s"], r["api_max_s"])
        met = met and worst <= target
        print(
            f"{name:34} {r['page_median_s']:>8.2f} / {r['page_max_s']:.2f} s"
            f" {r['api_median_s']:>14.2f} / {r['api_max_s']:.2f} s"
            f"   (HTTP {r['page_status']} / {r['api_status']})"
        )
    print(f"target {'met' if met else 'MISSED'}")
    record.save("webapp", {"timeout_s": args.timeout, "scenarios": results})


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
