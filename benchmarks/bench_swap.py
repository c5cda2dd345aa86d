"""Swap benchmark: alias move -> first answer from the new version, webhooks against polling.

Usage:
  python -m benchmarks swap                      # via `make bench`
  python -m benchmarks.bench_swap [--moves N] [--concurrency C] [--model-dir PATH]
                                  [--flow promote|move] [--replicas R] [--loopback]

A private tracking server started with `up`'s webhook settings (sqlite), a model (trained for a
few seconds at the demo architecture, or copied from --model-dir), then R model servers of
@production per mode (each with a home of its own, as on hosts of their own): polling every
2 s (no webhook), and webhooks (registered as `up` registers them, for the first replica, which
relays each delivery to the others through CAPTCHAOPS_WEBHOOK_PEERS; timer at its 30 s
safety-net interval). Under load from 8 clients in a process of their own (split between the
replicas), @production moves N times, at random phases of the poll, to a freshly registered
version (a copy of the first: the same network). With `--flow promote` (the default, the way
`train` then `promote` move a version) each version is first staged with a signed move, the
servers are given up to STAGE_WAIT_S to report it pre-loaded in /health, then promoted; with
`--flow move` @production moves to it directly. Each move is timed from just before the
registry call to the first 200 carrying the new X-Model-Version, from the last replica to
answer it, and also from the alias write itself: a thread reads the alias from the registry
every 25 ms while the writer runs (signing, the alias, the audit run), and the move counts from
the start of the last read that still saw the old version (the write came after it), so this
figure is an upper bound on alias move -> first answer, free of the writer's other work.

Layout (the record's "layout" and every figure's label say which ran): where issue 39's
multi-host test bed can be made (root, iproute2: `harness/replica_hosts.py`), each server is
`captchaops serve --host ADDR` on a network-namespace host of its own (one server too), reaching
the tracking server (and reached by its webhooks) through the bridge, and the load generators
run on a "client" host; with `--loopback`, or where the test bed cannot be made (said in one
line), everything runs on 127.0.0.1. Every process either layout starts (tracking server,
forwarder, servers and their workers, load generators) is a descendant of this process, so a
cgroup CPU quota on it (`python -m benchmarks --speed half`) throttles them all; every
namespace is removed at the end, on failure, Ctrl-C or SIGTERM too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx

from benchmarks import record
from benchmarks.bench_serving import MODEL_NAME, LoadResult, prepare_model, request_body, run_load
from captchaops.settings import Settings, load_settings
from captchaops.stack import webhooks
from harness import hosts, replica_hosts
from harness.processes import VENV_BIN, free_port, http_service, tracking_server
from harness.stack import SIGNING_KEY_ENV, copy_version, share_signing_key

TARGET_S = 0.5
SETTLE_S = 3.0
"""Load before the first move and between moves (the new version's answers, then steady)."""
Row = tuple[list[float], int, list[float], list[tuple[float, float, float]], list[float]]
"""Per mode: seconds to the first new answer per move, failed requests, the servers' load
seconds per swap, the first server's RSS before staging / pre-loaded / after (MiB), and the
seconds from the alias write (an upper bound) to the first new answer per move."""
ALIAS_READ_S = 0.025
SWAP_WAIT_S = 12.0
"""How long after a move the servers may take to serve the new version (a slower swap reads as
infinite: the load of that move's slot has ended)."""
STAGE_WAIT_S = 15.0
"""How long a staged version may take to be reported pre-loaded before it is promoted anyway
(a server that does not pre-load never reports it)."""


def move_alias(tracking_uri: str, version: str, alias: str = "production") -> tuple[float, float]:
    """Point `alias` at `version` through the registry writer (signed and audited); the
    wall-clock time just before the call, and how long the registry took to make it."""
    from mlflow import MlflowClient

    from captchaops.registry.aliases import assign_alias

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    moved = time.time()
    assign_alias(client, MODEL_NAME, alias, version, reason="swap benchmark", actor="bench_swap")
    return moved, time.time() - moved


class AliasWatch:
    """Reads `alias` from the registry every ALIAS_READ_S in a thread; `moved_after(version)` is
    the wall-clock start of the last read that did not yet see `version` (the write came later)."""

    def __init__(self, tracking_uri: str, alias: str) -> None:
        from mlflow import MlflowClient

        self._client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        self._alias = alias
        self._reads: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.time()
            with contextlib.suppress(Exception):  # a failed read tells nothing either way
                found = self._client.get_model_version_by_alias(MODEL_NAME, self._alias)
                self._reads.append((began, str(found.version)))
            self._stop.wait(ALIAS_READ_S)

    def __enter__(self) -> AliasWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def moved_after(self, version: str) -> float | None:
        """Start of the last read before the first that saw `version` (None: never seen)."""
        before = None
        for began, seen in self._reads:
            if seen == version:
                return before
            before = began
        return None


def wait_preloaded(urls: list[str], version: str) -> tuple[float, int]:
    """Seconds until every server reports `version` pre-loaded (at most STAGE_WAIT_S), and the
    first server's RSS then (bytes)."""
    started = time.monotonic()
    while True:
        healths = [httpx.get(f"{url}/health", timeout=5).json() for url in urls]
        done = all(h.get("preloaded_version") == version for h in healths)
        if done or time.monotonic() - started >= STAGE_WAIT_S:
            return time.monotonic() - started, int(healths[0].get("rss_bytes", 0))
        time.sleep(0.1)


def rss(url: str) -> int:
    """A server's RSS in bytes, as its /health reports it."""
    return int(httpx.get(f"{url}/health", timeout=5).json().get("rss_bytes", 0))


def measure_mode(
    urls: list[str],
    tracking_uri: str,
    source: str,
    moves: int,
    concurrency: int,
    body: Path,
    flow: str,
    where: Callable[[list[str]], list[str]] = list,
) -> Row:
    """Move the alias `moves` times under load (its clients started by `where`); seconds to the
    first new answer from the last replica per move, failed requests, and the servers' own load
    seconds per swap."""
    fresh = [copy_version(tracking_uri, MODEL_NAME, source) for _ in range(moves)]
    staging = STAGE_WAIT_S if flow == "promote" else 0.0
    slot = SETTLE_S + SWAP_WAIT_S + 2.0 + staging
    seconds = SETTLE_S + moves * slot
    boxes: list[dict[str, LoadResult]] = [{} for _ in urls]
    share = max(1, concurrency // len(urls))
    loads = [
        threading.Thread(
            target=lambda u=url, b=box: b.setdefault("r", run_load(u, share, seconds, body, where))
        )
        for url, box in zip(urls, boxes, strict=True)
    ]
    for load in loads:
        load.start()
    moved_at: list[float] = []
    alias_at: list[float | None] = []
    calls: list[float] = []
    load_s: list[float] = []
    staged_s: list[float] = []
    rss_mib: list[tuple[float, float, float]] = []
    """The first server's RSS before staging, once pre-loaded, and after the swap (MiB)."""
    jitter = random.Random(7)
    time.sleep(SETTLE_S)
    for version in fresh:
        slot_end = time.monotonic() + slot
        if flow == "promote":
            before = rss(urls[0])
            move_alias(tracking_uri, version, "staging")
            waited, preloaded = wait_preloaded(urls, version)
            staged_s.append(waited)
        # Moves at random phases of the 2 s poll: evenly spaced moves would all land at one.
        time.sleep(jitter.uniform(0.0, 2.0))
        with AliasWatch(tracking_uri, "production") as watch:
            moved, call = move_alias(tracking_uri, version)
            time.sleep(0.1)  # a read after the call returned
        moved_at.append(moved)
        alias_at.append(watch.moved_after(version))
        calls.append(call)
        for url in urls:
            deadline = time.monotonic() + SWAP_WAIT_S
            while time.monotonic() < deadline:
                answer = httpx.get(f"{url}/version", timeout=5).json()
                if answer.get("version") == version:
                    load_s.append(float(answer["load_seconds"]))
                    break
                time.sleep(0.05)
        if flow == "promote":
            rss_mib.append((before / 2**20, preloaded / 2**20, rss(urls[0]) / 2**20))
        time.sleep(max(0.0, slot_end - time.monotonic()))
    for load in loads:
        load.join()
    results = [box["r"] for box in boxes]
    swaps, from_alias = [], []
    for version, moved, written in zip(fresh, moved_at, alias_at, strict=True):
        lasts = []
        for result in results:
            firsts = [t for t, v in result.versions if v == version and t >= moved]
            lasts.append(min(firsts) if firsts else float("inf"))
        swaps.append(max(lasts) - moved)
        from_alias.append(max(lasts) - written if written is not None else float("inf"))
    staged = f"; staged to reported pre-loaded: {', '.join(f'{x:.1f}' for x in staged_s)} s"
    print(
        f"  registry call per move: {', '.join(f'{c:.2f}' for c in calls)} s; server load+warm-up "
        f"per swap: {', '.join(f'{x:.2f}' for x in load_s)} s{staged if staged_s else ''}",
        flush=True,
    )
    if rss_mib:
        print(
            "  first server's RSS before staging / pre-loaded / after the swap: "
            + ", ".join(f"{a:.0f}/{b:.0f}/{c:.0f}" for a, b, c in rss_mib)
            + " MiB",
            flush=True,
        )
    print(
        "  first new answer minus the registry call's own time (negative: answered before the "
        f"writer returned): {', '.join(f'{w - c:+.2f}' for w, c in zip(swaps, calls, strict=True))} s",
        flush=True,
    )
    print(
        "  from the alias write (upper bound): " + ", ".join(f"{x:.2f}" for x in from_alias) + " s",
        flush=True,
    )
    return swaps, sum(r.failed for r in results), load_s, rss_mib, from_alias


def serve_cmd(port: int) -> list[str]:
    return [str(VENV_BIN / "captchaops"), "serve", "--alias", "production", "--port", str(port)]


def server_env(mode: str, n: int, *, urls: list[str], secret: str) -> dict[str, str]:
    """Server n's own settings in `mode`: polling every 2 s; with webhooks, the secret, and for
    the first server (the one MLflow delivers to) the others as peers to relay to."""
    env = {
        "CAPTCHAOPS_MODEL_NAME": MODEL_NAME,
        "CAPTCHAOPS_POLL_SECONDS": "2",
        "CAPTCHAOPS_REPLICA_ID": f"r{n}",
    }
    if mode == "webhooks":
        env["CAPTCHAOPS_WEBHOOK_SECRET"] = secret
        if n == 0 and len(urls) > 1:
            env["CAPTCHAOPS_WEBHOOK_PEERS"] = ",".join(urls[1:])
    return env


def main(argv: list[str] | None = None) -> None:
    """Run both modes and print the comparison."""
    args = _parse(argv or [])
    layout = "loopback"
    if not args.loopback:
        why = hosts.unavailable()
        if why is None:
            layout = "hosts"
        else:
            print(f"no multi-host test bed ({why}): running on loopback", flush=True)
    replica_hosts.exit_on_sigterm()  # a TERM unwinds: every namespace and process goes
    work = Path(tempfile.mkdtemp(prefix="bench-swap-"))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CAPTCHAOPS_", "MLFLOW_"))}
    base["PATH"] = f"{VENV_BIN}{os.pathsep}{base.get('PATH', '')}"
    # the servers follow only moves signed with the key this process's registry writer uses
    base[SIGNING_KEY_ENV] = str(share_signing_key(work))
    settings = webhooks.ensure_secrets(load_settings(home=work / "home"))
    assert settings.webhook_secret is not None
    secret = settings.webhook_secret.get_secret_value()
    load_before = os.getloadavg()
    rows: dict[str, Row] = {}
    try:
        with tracking_server(work, env={**base, **webhooks.tracking_env(settings)}) as tracking:
            if args.model_dir is None:
                print("training a demo-architecture model for a few seconds ...", flush=True)
            version_a, _ = prepare_model(tracking.uri, args.model_dir, work)
            body = request_body(work)
            for mode in ("polling", "webhooks"):
                with contextlib.ExitStack() as servers:
                    where: Callable[[list[str]], list[str]] = list
                    if layout == "hosts":
                        bed = servers.enter_context(
                            replica_hosts.bed(tracking.uri, args.replicas, work / f"hosts-{mode}")
                        )
                        urls, where = bed.urls, bed.client_command
                        bed.serve(
                            "production", base, partial(server_env, mode, urls=urls, secret=secret)
                        )
                        bed.wait_serving()
                    else:
                        ports = [free_port() for _ in range(args.replicas)]
                        urls = [f"http://127.0.0.1:{port}" for port in ports]
                        for n, port in enumerate(ports):
                            env = {
                                **base,
                                "CAPTCHAOPS_HOME": str(work / f"serve-{mode}-{n}"),
                                "CAPTCHAOPS_TRACKING_URI": tracking.uri,
                                **server_env(mode, n, urls=urls, secret=secret),
                            }
                            log = work / f"serve-{mode}-{n}.log"
                            servers.enter_context(
                                http_service(
                                    serve_cmd(port),
                                    f"{urls[n]}/health",
                                    env=env,
                                    log=log,
                                    timeout=120,
                                )
                            )
                    if mode == "webhooks":
                        _register(settings, tracking.uri, urls[0])
                    health = httpx.get(f"{urls[-1]}/health", timeout=5).json()
                    print(f"{mode}: server reports {webhooks.describe_swaps(health)}", flush=True)
                    rows[mode] = measure_mode(
                        urls,
                        tracking.uri,
                        version_a,
                        args.moves,
                        args.concurrency,
                        body,
                        args.flow,
                        where,
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, load_before, os.getloadavg(), args, layout)


def _register(settings: Settings, tracking_uri: str, url: str) -> None:
    target = settings.model_copy(
        update={"tracking_uri": tracking_uri, "model_name": MODEL_NAME, "production_url": url}
    )
    (registration,) = webhooks.register(target, ("production",))
    if not registration.ok:
        raise RuntimeError(f"webhook registration failed: {registration.detail}")


def report(
    rows: dict[str, Row],
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
    args: argparse.Namespace,
    layout: str,
) -> None:
    """Print the comparison and write bench-results/swap.json (a dated record with --record)."""
    out: dict[str, object] = {"flow": args.flow, "replicas": args.replicas, "moves": args.moves}
    out["layout"] = layout
    figures: dict[str, str] = {}
    where = f"{args.replicas} replicas" if args.replicas > 1 else "one server"
    where += f" (layout {layout})"
    print(
        f"alias move -> first answer from the new version ({where}, flow {args.flow}, "
        f"{args.concurrency} clients):"
    )
    for mode, (swaps, failed, load_s, rss_mib, from_alias) in rows.items():
        median = statistics.median(swaps)
        print(
            f"  {mode:>8}: median {median:.2f} s, worst {max(swaps):.2f} s "
            f"(each: {', '.join(f'{s:.2f}' for s in swaps)}), {failed} failed requests; "
            f"server load+warm-up median {statistics.median(load_s or [0.0]):.2f} s"
        )
        out[mode] = {
            "swap_seconds": swaps,
            "failed": failed,
            "load_seconds": load_s,
            "rss_mib_before_staged_after": rss_mib,
            "from_alias_write_seconds": from_alias,
        }
        figures[f"swap, {mode}, {where}, flow {args.flow}"] = (
            f"median {median:.2f} s, max {max(swaps):.2f} s over {len(swaps)} moves, "
            f"{failed} failed requests"
        )
        figures[f"swap from the alias write (upper bound), {mode}, {where}, flow {args.flow}"] = (
            f"median {statistics.median(from_alias):.2f} s, max {max(from_alias):.2f} s"
        )
        if rss_mib:
            grown = statistics.median(b - a for a, b, _ in rss_mib)
            figures[f"RSS growth from staging to promotion, {mode}"] = (
                f"+{grown:.0f} MiB (median over {len(rss_mib)} stagings, first server)"
            )
    webhook = rows.get("webhooks")
    if webhook:
        met = statistics.median(webhook[0]) <= TARGET_S and webhook[1] == 0
        print(
            f"target: median <= {TARGET_S} s with webhooks, 0 failed: {'met' if met else 'MISSED'}"
        )
        met = statistics.median(webhook[4]) <= TARGET_S and webhook[1] == 0
        print(
            f"target, from the alias write: median <= {TARGET_S} s with webhooks, 0 failed: "
            f"{'met' if met else 'MISSED'}"
        )
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after"
    )
    out["loadavg"] = {"before": load_before, "after": load_after, "cpus": os.cpu_count()}
    record.save("swap", out, figures)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_swap")
    parser.add_argument("--moves", type=int, default=5, help="alias moves per mode")
    parser.add_argument("--concurrency", type=int, default=8, help="load-generator clients")
    parser.add_argument("--model-dir", type=Path, help="an MLflow model folder to serve")
    parser.add_argument(
        "--flow",
        choices=("promote", "move"),
        default="promote",
        help="stage each version before promoting it (promote), or move production (move)",
    )
    parser.add_argument("--replicas", type=int, default=1, help="model servers of @production")
    parser.add_argument(
        "--loopback", action="store_true", help="every server on 127.0.0.1, not on the hosts"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
