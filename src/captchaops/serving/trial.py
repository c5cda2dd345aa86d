"""Trying a version in a child process before a model server loads it: the graph policy, then
opening and one warm-up prediction, under memory (RLIMIT_AS) and CPU (RLIMIT_CPU) limits and a
wall-clock timeout that kills the child.

A thread cannot be stopped: a graph that allocates gigabytes or loops for ever, run in the
server, takes the server's memory or leaves a core spinning. Run here, it takes only the child,
which the kernel or the timeout ends. The server opens the version itself only after the child
succeeded. Run as `python -m captchaops.serving.trial FOLDER MEMORY_BYTES CPU_SECONDS`.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image


class ImageModel(Protocol):
    """What a server needs from a loaded version."""

    meta: dict[str, Any]

    def predict_images(self, images: list[bytes]) -> list[dict[str, Any]]:
        """Text and confidence for each image."""
        ...


class TrialFailed(Exception):
    """The version failed its trial; the message is one line saying why."""


@dataclass(frozen=True)
class TrialLimits:
    """What the child trying a version may use before it is stopped."""

    memory_bytes: int = 2**30
    """Address space (RLIMIT_AS): a few hundred MiB open and run our models."""
    cpu_seconds: int = 60
    wall_seconds: float = 90.0


def warm_up(model: ImageModel) -> None:
    """Run one prediction on a blank image of the model's input size; raise if it misbehaves."""
    size = (int(model.meta["width"]), int(model.meta["height"]))
    buffer = io.BytesIO()
    Image.new("L", size, 255).save(buffer, format="PNG")
    result = model.predict_images([buffer.getvalue()])
    if (
        len(result) != 1
        or not isinstance(result[0].get("text"), str)
        or not 0.0 <= float(result[0].get("confidence", -1.0)) <= 1.0
    ):
        raise RuntimeError(f"warm-up prediction returned {result!r}, not one text and confidence")


def run_trial(folder: Path, limits: TrialLimits) -> list[str]:
    """Check, open and warm up the version in `folder` in a limited child; returns its op set.
    Raises TrialFailed with the reason (policy, memory, CPU or time) when the child fails."""
    command = [
        sys.executable,
        "-m",
        "captchaops.serving.trial",
        str(folder),
        str(limits.memory_bytes),
        str(limits.cpu_seconds),
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    try:
        done = subprocess.run(
            command, capture_output=True, timeout=limits.wall_seconds, env=env, check=False
        )
    except subprocess.TimeoutExpired as exc:  # subprocess.run has killed and reaped the child
        raise TrialFailed(
            f"trying the version took longer than {limits.wall_seconds:g} s; it was stopped"
        ) from exc
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else {}
    except ValueError:
        report = {}
    if not isinstance(report, dict):
        report = {}
    if done.returncode == 0 and isinstance(report.get("ops"), list):
        return [str(op) for op in report["ops"]]
    if "error" in report:
        raise TrialFailed(str(report["error"]))
    if done.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        raise TrialFailed(
            f"trying the version used more than {limits.cpu_seconds} s of CPU; it was stopped"
        )
    tail = " ".join(done.stderr.decode(errors="replace").split())[-200:]
    memory = limits.memory_bytes // 2**20
    why = f", likely over {memory} MiB of memory" if "alloc" in tail.lower() else ""
    raise TrialFailed(f"trying the version failed (exit {done.returncode}{why}): {tail}")


def _trial(folder: Path) -> list[str]:
    """In the child: the checks, the graph policy, opening and warm-up; the op set."""
    from captchaops.model.graph_policy import check_graph
    from captchaops.model.version import check_model_dir, open_version

    meta, onnx = check_model_dir(folder)
    ops = check_graph(onnx)
    if meta.onnx_ops and sorted(meta.onnx_ops) != ops:
        raise TrialFailed("the graph's operators differ from those meta.json records")
    warm_up(open_version(folder, check_ops=False))
    return ops


def _main(argv: list[str]) -> int:
    import resource

    folder, memory, cpu = Path(argv[0]), int(argv[1]), int(argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    try:
        report: dict[str, Any] = {"ops": _trial(folder)}
    except MemoryError:
        report = {"error": f"the version needed more than {memory // 2**20} MiB to load and run"}
    except Exception as exc:
        message = " ".join(str(exc).split())[:300]
        if "alloc" in message.lower():
            message = f"the version needed more than {memory // 2**20} MiB ({message[:120]})"
        report = {"error": message}
    print(json.dumps(report), flush=True)
    return 0 if "ops" in report else 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
