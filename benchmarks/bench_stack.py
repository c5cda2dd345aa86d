"""Stack benchmark: cold `captchaops up --core` to healthy, recovery after kill -9, RSS.

Targets (issue: foundation): tracking server + store <= 400 MB RSS together; back and
healthy within 10 s of a kill -9. The baseline is a plain `mlflow server --workers 1`
(job runners on, its defaults) measured in the same run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from harness.processes import VENV_BIN as BIN
from harness.processes import free_port, process_tree, rss_mb, wait_http

TARGET_RSS_MB = 400
TARGET_RECOVERY_S = 10


def _tree_rss_mb(pid: int) -> tuple[float, int]:
    return rss_mb(pid), len(process_tree(pid))


def _ours(home: Path) -> dict[str, float]:
    from captchaops.settings import Settings
    from captchaops.stack import supervisor

    port = free_port()
    env = {**os.environ, "CAPTCHAOPS_HOME": str(home), "CAPTCHAOPS_TRACKING_PORT": str(port)}
    url = f"http://127.0.0.1:{port}/health"
    t0 = time.monotonic()
    subprocess.run(
        [str(BIN / "captchaops"), "up", "--core"], env=env, check=True, capture_output=True
    )
    cold = time.monotonic() - t0
    settings = Settings(home=home)
    pid = int(supervisor.process_info(settings)["tracking"]["pid"])
    time.sleep(2)
    rss, nprocs = _tree_rss_mb(pid)
    os.kill(pid, signal.SIGKILL)
    t1 = time.monotonic()
    time.sleep(0.2)
    wait_http(url, timeout=120)
    recovery = time.monotonic() - t1
    subprocess.run([str(BIN / "captchaops"), "down"], env=env, check=True, capture_output=True)
    return {"cold_up_s": cold, "rss_mb": rss, "processes": nprocs, "recovery_s": recovery}


def _baseline(home: Path) -> dict[str, float]:
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--workers",
            "1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{home / 'base.db'}",
            "--artifacts-destination",
            str(home / "base-artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=home,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120)
        cold = time.monotonic() - t0
        time.sleep(5)
        rss, nprocs = _tree_rss_mb(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    return {"cold_up_s": cold, "rss_mb": rss, "processes": nprocs}


def main() -> None:
    """Print the stack benchmark table."""
    with tempfile.TemporaryDirectory() as tmp:
        ours = _ours(Path(tmp) / "home")
        base = _baseline(Path(tmp))
    print(f"{'':28}{'captchaops up':>16}{'mlflow server':>16}{'target':>10}")
    print(
        f"{'cold start to healthy (s)':28}{ours['cold_up_s']:>16.1f}{base['cold_up_s']:>16.1f}{'':>10}"
    )
    print(f"{'processes':28}{ours['processes']:>16.0f}{base['processes']:>16.0f}{'':>10}")
    print(
        f"{'tracking+store RSS (MB)':28}{ours['rss_mb']:>16.0f}{base['rss_mb']:>16.0f}"
        f"{'<= ' + str(TARGET_RSS_MB):>10}"
    )
    print(
        f"{'recovery after kill -9 (s)':28}{ours['recovery_s']:>16.1f}{'-':>16}{'<= ' + str(TARGET_RECOVERY_S):>10}"
    )
    print(f"RSS ratio ours/baseline: {ours['rss_mb'] / base['rss_mb']:.2f}")
    verdict = ours["rss_mb"] <= TARGET_RSS_MB and ours["recovery_s"] <= TARGET_RECOVERY_S
    print("targets met" if verdict else "target missed (see numbers above)")


if __name__ == "__main__":
    main()
