"""Data at any size for Ray work: peak memory of each Ray worker through `cv --cluster`, for a
small and a large stand-in folder side by side (issue 38: a 100,000-image folder at <= 1.5 GiB
per worker, independent of the folder's size).

Usage:
  python -m benchmarks shards                      # via `make bench`: 1,000 and 100,000 images
  python -m benchmarks.bench_shards [--counts 1000 100000] [--folds 2] [--steps 4]
                                    [--cache DIR] [--cpus 2]

Each folder of stand-in CAPTCHAs is built once into `--cache` (default
/tmp/captchaops-bench-shards/standin-<count>, in parts of 10,000 images with a seed each, so a
part's names are its own; a folder is renamed into place only when whole, and reused after)
and timed, so the seconds per 1,000 images are printed beside the run. Each count then runs
`captchaops cv --data FOLDER --cluster ADDRESS --folds F --steps S` as a user runs it, against
a local Ray head of `--cpus` CPUs started for the benchmark (`ray start --head` on 127.0.0.1,
so that its worker processes are this process's descendants and can be sampled), with a
tracking server of its own. Every 0.5 s the benchmark reads VmHWM (the kernel's peak resident
set) of each Ray worker process (`ray::` in its command line) and keeps the highest each
worker reached; the record holds each count's peak worker, the driver's peak, whether the
driver's data set was sent whole or streamed to the workers, the shards uploaded and the
ratio of the peaks (large / small). The folder's shards are content-addressed: a second run on
the same folder uploads nothing, which the benchmark checks by running the small folder twice
(`--no-again` skips that).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from harness.processes import VENV_BIN, free_port, start_tracking_server, stop_process

PART = 10_000  # images per part of a built folder (one seed each)
TARGET_GIB = 1.5
LOOPBACK_HEAD = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def standin_folder(count: int, cache: Path) -> tuple[Path, float | None]:
    """A stand-in folder of `count` images under `cache` (built once; reused after), and the
    seconds building it took (None when it was already there)."""
    from captchaops.data import standin

    folder = cache / f"standin-{count}"
    if folder.is_dir():
        return folder, None
    cache.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    partial = Path(tempfile.mkdtemp(prefix=f"standin-{count}-", dir=cache))
    for part, start in enumerate(range(0, count, PART)):
        n = min(PART, count - start)
        standin.build(partial / f"part{part:03d}", count=n, seed=1000 + part)
    partial.rename(folder)
    return folder, time.monotonic() - began


@dataclass
class Peaks:
    """The highest VmHWM seen for each Ray worker process and for the driver, in bytes."""

    workers: dict[int, int] = field(default_factory=dict)
    driver: int = 0


def vm_hwm(pid: int) -> int:
    """A process's peak resident set (VmHWM) in bytes, 0 if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else 0


def sample(head: int, driver: int, peaks: Peaks, stop: threading.Event) -> None:
    """Every 0.5 s until `stop`: the peak of each `ray::` process under the head, and the
    driver's."""
    while not stop.wait(0.5):
        try:
            tree = psutil.Process(head).children(recursive=True)
        except psutil.Error:
            continue
        for proc in tree:
            try:
                if not " ".join(proc.cmdline()).startswith("ray::"):
                    continue
            except psutil.Error:
                continue
            peaks.workers[proc.pid] = max(peaks.workers.get(proc.pid, 0), vm_hwm(proc.pid))
        peaks.driver = max(peaks.driver, vm_hwm(driver))


def start_head(work: Path, cpus: int, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` on 127.0.0.1 with `cpus` CPUs; its process and address."""
    port = free_port()
    log = work / f"ray-head-{port}.log"
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1"]
    cmd += ["--port", str(port), "--num-cpus", str(cpus), "--include-dashboard", "false"]
    proc = subprocess.Popen(
        cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while not _listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray start --head did not listen: {log.read_text()[-1500:]}")
        time.sleep(0.5)
    return proc, f"127.0.0.1:{port}"


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def stop_head(proc: subprocess.Popen) -> None:
    """Stop the head's whole process group (never `ray stop`, which stops every Ray here)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    stop_process(proc)


def run_cv(folder: Path, uri: str, work: Path, args: argparse.Namespace, name: str) -> dict:
    """One `cv --cluster` on a fresh head, sampled; what it measured."""
    from mlflow.tracking import MlflowClient

    token = work / "auth_token"
    if not token.exists():
        token.touch(mode=0o600)
        token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= LOOPBACK_HEAD | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    head, address = start_head(work, args.cpus, env)
    try:
        env |= {
            "CAPTCHAOPS_TRACKING_URI": uri,
            "CAPTCHAOPS_HOME": str(work / "home" / name),
            "CAPTCHAOPS_STAGING_FLOOR": "0",
            "COLUMNS": "120",
        }
        cmd = [str(VENV_BIN / "captchaops"), "cv", "--data", str(folder), "--cluster", address]
        cmd += ["--folds", str(args.folds), "--steps", str(args.steps)]
        cmd += ["--max-minutes", str(args.max_minutes)]
        began = time.monotonic()
        out = work / f"{name}.out"
        driver = subprocess.Popen(cmd, env=env, stdout=out.open("wb"), stderr=subprocess.STDOUT)
        peaks, stop = Peaks(), threading.Event()
        sampler = threading.Thread(target=sample, args=(head.pid, driver.pid, peaks, stop))
        sampler.start()
        try:
            code = driver.wait(timeout=args.timeout)
        finally:
            stop.set()
            sampler.join()
            if driver.poll() is None:
                stop_process(driver)
        wall = time.monotonic() - began
    finally:
        stop_head(head)
    text = out.read_text()
    if code != 0:
        raise RuntimeError(f"cv on {folder.name} failed ({code}): {text[-1500:]}")
    [line] = [x for x in text.splitlines() if x.startswith("parent run ")]
    client = MlflowClient(uri)
    parent = client.get_run(line.split()[2])
    folds = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    trained = [p for p in peaks.workers.values() if p > 0]
    return {
        "folder": folder.name,
        "images": int(parent.data.params["n_read"]),
        "cv_wall_s": round(wall, 1),
        "worker_peaks_mib": sorted(round(p / 2**20) for p in trained),
        "peak_worker_mib": round(max(trained, default=0) / 2**20),
        "driver_peak_mib": round(peaks.driver / 2**20),
        "shards": int(parent.data.metrics["dataset_shards"]),
        "shards_uploaded": int(parent.data.metrics["dataset_shards_uploaded"]),
        "folds_data": sorted({f.data.tags.get("captchaops.data", "?") for f in folds}),
        "fold_accuracy": [f.data.metrics.get("test_seq_acc") for f in folds],
    }


def main(argv: list[str] | None = None) -> None:
    """Build the folders, run `cv --cluster` on each, print and record the peaks."""
    from benchmarks import record

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_shards")
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-minutes", type=float, default=5.0)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per cv")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/captchaops-bench-shards"))
    parser.add_argument(
        "--no-again", action="store_true", help="skip the second cv on the smallest folder"
    )
    args = parser.parse_args(argv)
    counts = sorted(args.counts)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "tracking").mkdir()
        tracking = start_tracking_server(work / "tracking")
        try:
            for count in counts:
                folder, built = standin_folder(count, args.cache)
                row = {"count": count, "build_s": None if built is None else round(built, 1)}
                row |= run_cv(folder, tracking.uri, work, args, f"cv-{count}")
                rows.append(row)
                print(_line(row), flush=True)
            again = None
            if not args.no_again:
                again = run_cv(args.cache / small_folder(rows), tracking.uri, work, args, "again")
                print(f"second cv on {again['folder']}: {again['shards_uploaded']} uploaded")
        finally:
            stop_process(tracking.proc)
    small, large = rows[0], rows[-1]
    ratio = large["peak_worker_mib"] / max(small["peak_worker_mib"], 1)
    met = large["peak_worker_mib"] <= TARGET_GIB * 1024 and ratio <= 1.25
    print(
        f"peak RSS per worker: {small['peak_worker_mib']} MiB at {small['count']:,} images, "
        f"{large['peak_worker_mib']} MiB at {large['count']:,} (ratio {ratio:.2f}); target "
        f"<= {TARGET_GIB} GiB each, independent of size: {'met' if met else 'MISSED'}"
    )
    figures = {
        f"peak RSS per Ray worker, cv --cluster, {r['count']:,} images": (
            f"{r['peak_worker_mib']} MiB (driver {r['driver_peak_mib']} MiB; {r['folds_data'][0]})"
        )
        for r in rows
    }
    figures["ratio of the worker peaks, large / small"] = f"{ratio:.2f}"
    if again is not None:
        figures["second cv on the same folder"] = f"{again['shards_uploaded']} shards uploaded"
    record.save(
        "shards", {"runs": rows, "again": again, "ratio": ratio, "target_met": met}, figures
    )


def small_folder(rows: list[dict]) -> str:
    """The smallest folder's name (run again to check that it uploads nothing)."""
    return str(rows[0]["folder"])


def _line(row: dict) -> str:
    built = f", folder built in {row['build_s']} s" if row["build_s"] is not None else ""
    return (
        f"{row['count']:,} images{built}: cv {row['cv_wall_s']} s, peak worker "
        f"{row['peak_worker_mib']} MiB (all: {row['worker_peaks_mib']}), driver "
        f"{row['driver_peak_mib']} MiB, {row['shards']} shards ({row['shards_uploaded']} "
        f"uploaded); {'; '.join(row['folds_data'])}"
    )


if __name__ == "__main__":
    main()
