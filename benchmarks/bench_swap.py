"""Swap benchmark: alias move -> first answer from the new version, webhooks against polling.

Usage:
  python -m benchmarks swap                      # via `make bench`
  python -m benchmarks.bench_swap [--moves N] [--concurrency C] [--model-dir PATH]

A private tracking server started with `up`'s webhook settings (sqlite), a model (trained for a
few seconds at the demo architecture, or copied from --model-dir), then one model server per
mode: polling every 2 s (no webhook), and webhooks (registered as `up` registers them, timer at
its 30 s safety-net interval). Under load from 8 clients in a process of their own, the alias
moves N times, at random phases of the poll, to a freshly registered version (never cached);
each move is timed from just before the registry call to the first 200 carrying the new
X-Model-Version.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks import record
from benchmarks.bench_serving import MODEL_NAME, LoadResult, prepare_model, request_body, run_load
from captchaops.settings import Settings, load_settings
from captchaops.stack import webhooks
from harness.processes import VENV_BIN, free_port, http_service, tracking_server
from harness.stack import SIGNING_KEY_ENV, copy_version, share_signing_key

TARGET_S = 0.5
SETTLE_S = 3.0
"""Load before the first move and between moves (the new version's answers, then steady)."""


def move_alias(tracking_uri: str, version: str) -> tuple[float, float]:
    """Point production at `version` through the registry (an audited move); the wall-clock
    time just before the call, and how long the registry took to make it."""
    from mlflow import MlflowClient

    from captchaops import registry

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    moved = time.time()
    registry.assign_alias(
        client, MODEL_NAME, "production", version, reason="swap benchmark", actor="bench_swap"
    )
    return moved, time.time() - moved


def measure_mode(
    url: str, tracking_uri: str, source: str, moves: int, concurrency: int, body: Path
) -> tuple[list[float], int, list[float]]:
    """Move the alias `moves` times under load; seconds to the first new answer per move,
    failed requests, and the server's own load seconds per swap."""
    fresh = [copy_version(tracking_uri, MODEL_NAME, source) for _ in range(moves)]
    seconds = SETTLE_S + moves * (SETTLE_S + 5.0)
    box: dict[str, LoadResult] = {}
    load = threading.Thread(
        target=lambda: box.setdefault("r", run_load(url, concurrency, seconds, body))
    )
    load.start()
    moved_at: list[float] = []
    calls: list[float] = []
    load_s: list[float] = []
    jitter = random.Random(7)
    time.sleep(SETTLE_S)
    for version in fresh:
        # Moves at random phases of the 2 s poll: evenly spaced moves would all land at one.
        time.sleep(jitter.uniform(0.0, 2.0))
        moved, call = move_alias(tracking_uri, version)
        moved_at.append(moved)
        calls.append(call)
        deadline = time.monotonic() + SETTLE_S + 3.0
        while time.monotonic() < deadline:
            answer = httpx.get(f"{url}/version", timeout=5).json()
            if answer.get("version") == version:
                load_s.append(float(answer["load_seconds"]))
                break
            time.sleep(0.05)
        time.sleep(max(0.0, deadline - time.monotonic()))
    load.join()
    result = box["r"]
    swaps = []
    for version, moved in zip(fresh, moved_at, strict=True):
        firsts = [t for t, v in result.versions if v == version and t >= moved]
        swaps.append(min(firsts) - moved if firsts else float("inf"))
    print(
        f"  registry call per move: {', '.join(f'{c:.2f}' for c in calls)} s; server load+warm-up "
        f"per swap: {', '.join(f'{x:.2f}' for x in load_s)} s",
        flush=True,
    )
    return swaps, result.failed, load_s


def serve_cmd(port: int) -> list[str]:
    return [str(VENV_BIN / "captchaops"), "serve", "--alias", "production", "--port", str(port)]


def main(argv: list[str] | None = None) -> None:
    """Run both modes and print the comparison."""
    args = _parse(argv or [])
    work = Path(tempfile.mkdtemp(prefix="bench-swap-"))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CAPTCHAOPS_", "MLFLOW_"))}
    base["PATH"] = f"{VENV_BIN}{os.pathsep}{base.get('PATH', '')}"
    # the servers follow only moves signed with the key this process's registry writer uses
    base[SIGNING_KEY_ENV] = str(share_signing_key(work))
    settings = webhooks.ensure_secrets(load_settings(home=work / "home"))
    assert settings.webhook_secret is not None
    load_before = os.getloadavg()
    rows: dict[str, tuple[list[float], int, list[float]]] = {}
    try:
        with tracking_server(work, env={**base, **webhooks.tracking_env(settings)}) as tracking:
            if args.model_dir is None:
                print("training a demo-architecture model for a few seconds ...", flush=True)
            version_a, _ = prepare_model(tracking.uri, args.model_dir, work)
            body = request_body(work)
            for mode in ("polling", "webhooks"):
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                env = {
                    **base,
                    "CAPTCHAOPS_HOME": str(work / f"serve-{mode}"),
                    "CAPTCHAOPS_TRACKING_URI": tracking.uri,
                    "CAPTCHAOPS_MODEL_NAME": MODEL_NAME,
                    "CAPTCHAOPS_POLL_SECONDS": "2",
                }
                if mode == "webhooks":
                    env["CAPTCHAOPS_WEBHOOK_SECRET"] = settings.webhook_secret.get_secret_value()
                log = work / f"serve-{mode}.log"
                with http_service(serve_cmd(port), f"{url}/health", env=env, log=log, timeout=120):
                    if mode == "webhooks":
                        _register(settings, tracking.uri, url)
                    health = httpx.get(f"{url}/health", timeout=5).json()
                    print(f"{mode}: server reports {webhooks.describe_swaps(health)}", flush=True)
                    rows[mode] = measure_mode(
                        url, tracking.uri, version_a, args.moves, args.concurrency, body
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, load_before, os.getloadavg(), args.concurrency)


def _register(settings: Settings, tracking_uri: str, url: str) -> None:
    target = settings.model_copy(
        update={"tracking_uri": tracking_uri, "model_name": MODEL_NAME, "production_url": url}
    )
    (registration,) = webhooks.register(target, ("production",))
    if not registration.ok:
        raise RuntimeError(f"webhook registration failed: {registration.detail}")


def report(
    rows: dict[str, tuple[list[float], int, list[float]]],
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
    concurrency: int,
) -> None:
    """Print the comparison and write bench-results/swap.json."""
    out: dict[str, object] = {}
    print(f"alias move -> first answer from the new version ({concurrency} clients):")
    for mode, (swaps, failed, load_s) in rows.items():
        median = statistics.median(swaps)
        print(
            f"  {mode:>8}: median {median:.2f} s, worst {max(swaps):.2f} s "
            f"(each: {', '.join(f'{s:.2f}' for s in swaps)}), {failed} failed requests; "
            f"server load+warm-up median {statistics.median(load_s or [0.0]):.2f} s"
        )
        out[mode] = {"swap_seconds": swaps, "failed": failed, "load_seconds": load_s}
    webhook = rows.get("webhooks")
    if webhook:
        met = statistics.median(webhook[0]) <= TARGET_S and webhook[1] == 0
        print(
            f"target: median <= {TARGET_S} s with webhooks, 0 failed: {'met' if met else 'MISSED'}"
        )
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after"
    )
    out["loadavg"] = {"before": load_before, "after": load_after, "cpus": os.cpu_count()}
    record.save("swap", out)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_swap")
    parser.add_argument("--moves", type=int, default=5, help="alias moves per mode")
    parser.add_argument("--concurrency", type=int, default=8, help="load-generator clients")
    parser.add_argument("--model-dir", type=Path, help="an MLflow model folder to serve")
    return parser.parse_args(argv)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
