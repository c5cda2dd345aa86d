"""Promotions benchmark (issue 37): approval -> served, and the promotion service's added time.

Usage:
  python -m benchmarks promotions                    # via `make bench`
  python -m benchmarks promotions --reps 2           # a short smoke run
  python -m benchmarks.bench_promotions [--reps N] [--clients C] [--evalset-size S]
                                        [--model-dir PATH]

One invocation, local mode, on loopback: a private tracking server with `up`'s webhook settings,
a model (trained for a few seconds at the demo architecture, or copied from --model-dir), a
frozen set, one production model server following @production by webhook (as `up` registers
it; timer at its 30 s safety net), and two promotion services (`captchaops promotions serve`)
signing with the one promotion key the server trusts: one where production moves need a second
account's approval, one where they do not. C clients ask the server without pause and note
which version answered each request.

Each repetition moves @production three times, each to a fresh copy of the model (the same
network), staged first the way `train` stages it (scored on the frozen set, a signed @staging
move, the server reports it pre-loaded), then:

- direct: the registry writer in this process moves the alias (today's swap, as bench_swap's);
- promote: `captchaops promote`'s own work in this process, without the service (the checks on
  the version and the frozen set, then the same signed move);
- service: `POST /promote` to the service without approval (the caller holds no key);
- approved: an editor's `POST /promote` (not timed) waits as a request; a second account's
  `POST /approve` to the service is timed.

One repetition of all four comes first and is not counted (each process's first promotion
pays its imports and connections). Each is timed from just before the call (and from its return) to the first answer of the new
version any client got. Targets: approved, from `approve` returning to the first answer <= 1 s
(every repetition); service minus direct, medians from the call's start, <= 0.5 s.
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
from pathlib import Path

import httpx

from benchmarks import record
from benchmarks.bench_serving import MODEL_NAME, prepare_model, request_body
from benchmarks.bench_swap import move_alias, serve_cmd, server_env, wait_preloaded
from captchaops.settings import Settings, load_settings
from captchaops.stack import webhooks
from harness.processes import VENV_BIN, free_port, http_service, tracking_server
from harness.stack import SIGNING_KEY_ENV, copy_version, share_signing_key

TARGET_APPROVED_S = 1.0
TARGET_ADDED_S = 0.5
KINDS = ("direct", "promote", "service", "approved")
SERVED_WAIT_S = 15.0
"""How long after a call the server may take to answer with the new version (longer: inf)."""
SETTLE_S = 1.0
WARMUP_REPS = 1
"""Repetitions first made and not counted: a service's first promotion imports and connects
what later ones reuse (5 s at half speed), which is a process start, not a promotion."""
SERVICE_TIMEOUT_S = 300.0


class Probe:
    """Clients asking the server without pause; each answer's wall-clock arrival and version."""

    def __init__(self, url: str, body: bytes, clients: int) -> None:
        self.url = url
        self.body = body
        self.answers: list[tuple[float, str]] = []
        self.failed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        headers = {"Content-Type": "application/json"}
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    answer = client.post(
                        f"{self.url}/invocations", content=self.body, headers=headers
                    )
                except httpx.HTTPError:
                    answer = None
                arrived = time.time()
                with self._lock:
                    if answer is None or answer.status_code != 200:
                        self.failed += 1
                    else:
                        self.answers.append((arrived, answer.headers.get("X-Model-Version", "")))

    def first(self, version: str, after: float) -> float | None:
        """When the first answer from `version` arrived after `after` (None: none yet)."""
        with self._lock:
            found = [t for t, v in self.answers if v == version and t >= after]
        return min(found) if found else None

    def wait(self, version: str, after: float) -> float:
        """The first answer from `version` after `after`, waiting up to SERVED_WAIT_S (inf)."""
        deadline = time.monotonic() + SERVED_WAIT_S
        while time.monotonic() < deadline:
            found = self.first(version, after)
            if found is not None:
                return found
            time.sleep(0.02)
        return float("inf")

    def __enter__(self) -> Probe:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)


def ask(url: str, path: str, body: dict[str, object]) -> dict[str, object]:
    """One call to a promotion service; its JSON answer, or RuntimeError with its detail."""
    answer = httpx.post(
        f"{url}{path}", json={"model": MODEL_NAME, **body}, timeout=SERVICE_TIMEOUT_S
    )
    found = answer.json()
    if answer.status_code != 200:
        raise RuntimeError(f"{path} answered HTTP {answer.status_code}: {found.get('detail')}")
    return dict(found)


def stage(settings: Settings, url: str, version: str) -> None:
    """What `train` does before a promotion: score the version on the frozen set (recorded on
    the version), move @staging to it (signed); then wait for the server to pre-load it."""
    from captchaops import mlflow_scope
    from captchaops.decisions.scores import scores

    scores(mlflow_scope.client(settings), settings, version, None)
    move_alias(settings.effective_tracking_uri, version, "staging")
    wait_preloaded([url], version)


def move(
    kind: str, version: str, settings: Settings, services: dict[str, str]
) -> tuple[float, float]:
    """Move @production to `version` the `kind` way; wall-clock times just before the timed
    call and just after it returned."""
    from captchaops.decisions import promotion

    if kind == "approved":
        waiting = ask(
            services["approval"],
            "/promote",
            {"version": version, "reason": "bench_promotions", "actor": "ed"},
        )
        if waiting.get("result") != "waiting":
            raise RuntimeError(f"the request did not wait for approval: {waiting}")
        request = waiting["request"]
        assert isinstance(request, dict)
        began = time.time()
        done = ask(services["approval"], "/approve", {"request": request["id"], "actor": "alice"})
        if done.get("result") != "promoted":
            raise RuntimeError(f"the approval did not promote: {done}")
    elif kind == "service":
        began = time.time()
        done = ask(
            services["direct"],
            "/promote",
            {"version": version, "reason": "bench_promotions", "actor": "bench"},
        )
        if done.get("result") != "promoted":
            raise RuntimeError(f"the service did not promote: {done}")
    elif kind == "promote":
        began = time.time()
        promotion.promote(settings, version=version, reason="bench_promotions", actor="bench")
    else:
        began, _ = move_alias(settings.effective_tracking_uri, version)
    return began, time.time()


def measure(
    settings: Settings, url: str, services: dict[str, str], probe: Probe, source: str, reps: int
) -> dict[str, list[tuple[float, float]]]:
    """Per kind, (seconds from the call's start, from its return) to the first new answer."""
    tracking_uri = settings.effective_tracking_uri
    out: dict[str, list[tuple[float, float]]] = {kind: [] for kind in KINDS}
    jitter = random.Random(37)
    for rep in range(-WARMUP_REPS, reps):
        for kind in KINDS:
            version = copy_version(tracking_uri, MODEL_NAME, source)
            stage(settings, url, version)
            time.sleep(SETTLE_S + jitter.uniform(0.0, 0.5))
            began, returned = move(kind, version, settings, services)
            first = probe.wait(version, began)
            if rep >= 0:
                out[kind].append((first - began, first - returned))
            print(
                f"  {f'rep {rep + 1}' if rep >= 0 else 'warm-up'} {kind:>8}: v{version} first "
                f"answer {first - began:.2f} s after the call began, {first - returned:+.2f} s "
                "after it returned",
                flush=True,
            )
    return out


def main(argv: list[str] | None = None) -> None:
    """Start the stack, move @production the three ways, print and record the comparison."""
    args = _parse(argv or [])
    work = Path(tempfile.mkdtemp(prefix="bench-promotions-"))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CAPTCHAOPS_", "MLFLOW_"))}
    base["PATH"] = f"{VENV_BIN}{os.pathsep}{base.get('PATH', '')}"
    base[SIGNING_KEY_ENV] = str(share_signing_key(work))  # the services' key is this one
    hooks = webhooks.ensure_secrets(load_settings(home=work / "home"))
    assert hooks.webhook_secret is not None
    secret = hooks.webhook_secret.get_secret_value()
    load_before = os.getloadavg()
    try:
        with (
            tracking_server(work, env={**base, **webhooks.tracking_env(hooks)}) as tracking,
            contextlib.ExitStack() as stack,
        ):
            if args.model_dir is None:
                print("training a demo-architecture model for a few seconds ...", flush=True)
            source, _ = prepare_model(tracking.uri, args.model_dir, work)
            settings = load_settings(home=work / "home", tracking_uri=tracking.uri)
            _evalset(settings, args.evalset_size)
            url = _server(stack, work, base, tracking.uri, secret)
            target = hooks.model_copy(
                update={
                    "tracking_uri": tracking.uri,
                    "model_name": MODEL_NAME,
                    "production_url": url,
                }
            )
            (registration,) = webhooks.register(target, ("production",))
            if not registration.ok:
                raise RuntimeError(f"webhook registration failed: {registration.detail}")
            services = {
                "direct": _service(stack, work, base, tracking.uri, approval=""),
                "approval": _service(stack, work, base, tracking.uri, approval=MODEL_NAME),
            }
            body = request_body(work).read_bytes()
            with Probe(url, body, args.clients) as probe:
                time.sleep(SETTLE_S)
                rows = measure(settings, url, services, probe, source, args.reps)
            failed = probe.failed
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, failed, load_before, os.getloadavg(), args)


def _evalset(settings: Settings, size: int) -> None:
    from captchaops import mlflow_scope
    from captchaops.evaluation.evalset import create_evalset

    create_evalset(mlflow_scope.client(settings), settings, size=size)


def _server(
    stack: contextlib.ExitStack, work: Path, base: dict[str, str], uri: str, secret: str
) -> str:
    """The production model server (webhooks, as `up` starts it); its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **base,
        "CAPTCHAOPS_HOME": str(work / "serve"),
        "CAPTCHAOPS_TRACKING_URI": uri,
        **server_env("webhooks", 0, urls=[url], secret=secret),
    }
    stack.enter_context(
        http_service(serve_cmd(port), f"{url}/health", env=env, log=work / "serve.log", timeout=120)
    )
    return url


def _service(
    stack: contextlib.ExitStack, work: Path, base: dict[str, str], uri: str, *, approval: str
) -> str:
    """A promotion service (local mode) with the shared key; its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    home = work / f"service-{port}"
    env = {
        **base,
        "CAPTCHAOPS_HOME": str(home),
        "CAPTCHAOPS_TRACKING_URI": uri,
        "CAPTCHAOPS_MODEL_NAME": MODEL_NAME,
        "CAPTCHAOPS_PRODUCTION_APPROVAL": approval,
    }
    cmd = [str(VENV_BIN / "captchaops"), "promotions", "serve", "--port", str(port)]
    stack.enter_context(
        http_service(cmd, f"{url}/health", env=env, log=home.with_suffix(".log"), timeout=120)
    )
    return url


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), max(values)


def report(
    rows: dict[str, list[tuple[float, float]]],
    failed: int,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
    args: argparse.Namespace,
) -> None:
    """Print the comparison and write bench-results/promotions.json (a record with --record)."""
    reps = len(rows["direct"])
    print(
        f"@production move -> first answer of the new version (one server, webhooks, local "
        f"mode, {args.clients} clients, {reps} repetitions, frozen set {args.evalset_size}):"
    )
    figures: dict[str, str] = {}
    out: dict[str, object] = {"reps": reps, "clients": args.clients, "failed": failed}
    out["evalset_size"] = args.evalset_size
    for kind in KINDS:
        start = [s for s, _ in rows[kind]]
        ret = [r for _, r in rows[kind]]
        (m_s, x_s), (m_r, x_r) = _stats(start), _stats(ret)
        print(
            f"  {kind:>8}: from the call's start median {m_s:.2f} s, max {x_s:.2f} s; from its "
            f"return median {m_r:+.2f} s, max {x_r:+.2f} s"
        )
        out[kind] = {"from_start_seconds": start, "from_return_seconds": ret}
        figures[f"promotion to first answer, {kind}, local mode, one server, webhooks"] = (
            f"from the call median {m_s:.2f} s, max {x_s:.2f} s; from its return median "
            f"{m_r:+.2f} s, max {x_r:+.2f} s ({reps} repetitions)"
        )
    direct = statistics.median(s for s, _ in rows["direct"])
    promote = statistics.median(s for s, _ in rows["promote"])
    service = statistics.median(s for s, _ in rows["service"])
    added = service - direct
    ratio = service / direct if direct > 0 else float("inf")
    print(
        f"  through the service vs direct (medians from the call's start): {service:.2f} s vs "
        f"{direct:.2f} s, {ratio:.2f}x, added {added:+.2f} s"
    )
    hop = service - promote
    print(
        f"  through the service vs `promote` in-process: {service:.2f} s vs {promote:.2f} s, "
        f"added {hop:+.2f} s (the HTTP call and the service process; the rest is promote's checks)"
    )
    figures["promotion service added time over an in-process promote, local mode"] = (
        f"{hop:+.2f} s ({service:.2f} s vs {promote:.2f} s median)"
    )
    out["added_over_promote_seconds"] = hop
    approved_max = max(r for _, r in rows["approved"])
    met_a = approved_max <= TARGET_APPROVED_S and failed == 0
    met_b = added <= TARGET_ADDED_S and failed == 0
    print(
        f"target: served <= {TARGET_APPROVED_S} s after `approve` returns (every repetition, "
        f"worst {approved_max:+.2f} s), 0 failed requests: {'met' if met_a else 'MISSED'}"
    )
    print(
        f"target: the service adds <= {TARGET_ADDED_S} s to the direct move ({added:+.2f} s), "
        f"0 failed requests: {'met' if met_b else 'MISSED'}"
    )
    print(f"  {failed} failed requests during the run")
    figures["promotion service added time over a direct move, local mode"] = (
        f"{added:+.2f} s ({service:.2f} s vs {direct:.2f} s median, {ratio:.2f}x), "
        f"{failed} failed requests"
    )
    out["added_seconds"] = added
    out["ratio"] = ratio
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after"
    )
    out["loadavg"] = {"before": load_before, "after": load_after, "cpus": os.cpu_count()}
    record.save("promotions", out, figures)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_promotions")
    parser.add_argument("--reps", type=int, default=5, help="moves of each kind")
    parser.add_argument("--clients", type=int, default=2, help="clients asking the server")
    parser.add_argument("--evalset-size", type=int, default=200, help="frozen set size")
    parser.add_argument("--model-dir", type=Path, help="an MLflow model folder to serve")
    return parser.parse_args(argv)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
