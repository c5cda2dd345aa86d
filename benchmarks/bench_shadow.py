"""Shadow-traffic benchmark: production's p99 at 8 concurrent clients with shadow on vs off.

Usage:
  python -m benchmarks shadow                  # via `make bench`
  python -m benchmarks.bench_shadow [--duration S] [--rounds N] [--concurrency C]

One private tracking server and one model, registered once and served three times on this
machine: staging, production without a shadow, and production copying every request to
staging. The load generator (its own process, one CAPTCHA per request) alternates between the
two productions for several rounds so background load on the machine hits both alike. Reports
each round's p99, the median p99 of each and their ratio (target: within 10%), and what the
copies gave (agreement, drops) from production's /metrics. Results go to bench-results/shadow.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path
from subprocess import Popen

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import record
from benchmarks.bench_serving import (
    MODEL_NAME,
    LoadResult,
    prepare_model,
    request_body,
    run_load,
)
from captchaops.settings import Settings
from harness.processes import VENV_BIN, free_port, http_service, tracking_server
from harness.stack import share_signing_key

TARGET_RATIO = 1.10


def shadow_counts(url: str) -> dict[str, float]:
    """Production's shadow outcomes (agree, disagree, refused, error, dropped), summed."""
    counts: dict[str, float] = {}
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "captchaops_shadow_requests_total":
                result = sample.labels["result"]
                counts[result] = counts.get(result, 0.0) + sample.value
    return counts


def cpu_seconds(pid: int) -> float:
    """User and system CPU a process has used so far."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def main(argv: list[str] | None = None) -> None:
    """Run the shadow benchmark and print the comparison."""
    args = _parse(argv or [])
    work = Path(tempfile.mkdtemp(prefix="bench-shadow-"))
    share_signing_key(work)  # servers follow only moves signed with the key the writer here uses
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    try:
        with tracking_server(work, env=env) as tracking:
            tracking_uri = tracking.uri
            print("training a demo-architecture model for a few seconds ...", flush=True)
            version, _ = prepare_model(tracking_uri, None, work)
            from mlflow import MlflowClient

            from captchaops.registry.aliases import assign_alias

            assign_alias(
                MlflowClient(tracking_uri, registry_uri=tracking_uri),
                MODEL_NAME,
                "staging",
                version,
                reason="shadow benchmark",
                actor="bench_shadow",
            )
            body = request_body(work)
            per_second = args.per_second or Settings().shadow_per_second
            ports = {name: free_port() for name in ("staging", "off", "on")}
            urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}

            def server(name: str, alias: str, shadow: str) -> AbstractContextManager[Popen[bytes]]:
                return http_service(
                    [
                        str(VENV_BIN / "captchaops"), "serve", "--alias", alias,
                        "--port", str(ports[name]),
                    ],
                    f"{urls[name]}/health",
                    env={
                        **env,
                        "CAPTCHAOPS_HOME": str(work / f"home-{name}"),
                        "CAPTCHAOPS_TRACKING_URI": tracking_uri,
                        "CAPTCHAOPS_MODEL_NAME": MODEL_NAME,
                        "CAPTCHAOPS_SHADOW_URL": shadow,
                        "CAPTCHAOPS_SHADOW_PER_SECOND": str(per_second),
                    },
                    log=work / f"{name}.log",
                    timeout=120,
                )  # fmt: skip

            with (
                server("staging", "staging", "") as staging,
                server("off", "production", "") as off,
                server("on", "production", urls["staging"]) as on,
            ):
                print(
                    f"version {version} served 3 times; {args.rounds} rounds of "
                    f"{args.duration:.0f}s at {args.concurrency} clients; shadow on copies at "
                    f"most {per_second:g} requests/s",
                    flush=True,
                )
                for name in ("off", "on"):
                    run_load(urls[name], 2, 2.0, body)
                results: dict[str, list[LoadResult]] = {"off": [], "on": []}
                for round_ in range(args.rounds):
                    for name in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                        procs = {"prod": on if name == "on" else off, "staging": staging}
                        before = {k: cpu_seconds(p.pid) for k, p in procs.items()}
                        result = run_load(urls[name], args.concurrency, args.duration, body)
                        results[name].append(result)
                        used = {k: cpu_seconds(p.pid) - before[k] for k, p in procs.items()}
                        print(
                            f"  round {round_ + 1} shadow {name:>3}: {result.rps:7.1f} req/s  "
                            f"p50 {result.p50_ms:6.1f} ms  p99 {result.p99_ms:6.1f} ms  "
                            f"failed {result.failed}  CPU/request: production "
                            f"{used['prod'] / result.ok * 1000:.2f} ms, staging "
                            f"{used['staging'] / result.ok * 1000:.2f} ms",
                            flush=True,
                        )
                counts = shadow_counts(urls["on"])
        report(results, counts)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(results: dict[str, list[LoadResult]], counts: dict[str, float]) -> None:
    """Print the medians and the ratio, and write them to bench-results/shadow.json."""
    p99 = {name: statistics.median(r.p99_ms for r in rows) for name, rows in results.items()}
    p50 = {name: statistics.median(r.p50_ms for r in rows) for name, rows in results.items()}
    rps = {name: statistics.median(r.rps for r in rows) for name, rows in results.items()}
    ratio = p99["on"] / p99["off"] if p99["off"] else float("nan")
    compared = counts.get("agree", 0.0) + counts.get("disagree", 0.0)
    copies = sum(counts.values())
    print()
    for name in ("off", "on"):
        print(
            f"shadow {name:>3}: median p99 {p99[name]:6.1f} ms, p50 {p50[name]:6.1f} ms, "
            f"{rps[name]:7.1f} req/s, failed {sum(r.failed for r in results[name])}"
        )
    print(f"p99 ratio on/off {ratio:.2f} (target <= {TARGET_RATIO:.2f})")
    print(
        "copies: "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(counts.items()))
        + f" (compared {compared / copies:.0%} of {copies:.0f})"
        if copies
        else "copies: none counted"
    )
    record.save(
        "shadow",
        {
            "p99_ms": p99,
            "p50_ms": p50,
            "rps": rps,
            "p99_ratio": ratio,
            "rounds": {n: [r.p99_ms for r in rows] for n, rows in results.items()},
            "shadow": counts,
        },
    )


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_shadow")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each, alternating")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--per-second", type=float, help="CAPTCHAOPS_SHADOW_PER_SECOND (default: the setting's)"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
