"""Trying a version in a child process before a model server loads it: the graph policy, then
opening and warm-up predictions at the server's largest batch (a batch of white, one of black,
one of noise images and one of real images from the scheme's frozen evaluation set), under
memory (RLIMIT_AS), CPU (RLIMIT_CPU) and output-size (RLIMIT_FSIZE) limits and a wall-clock
timeout that kills the child.

A thread cannot be stopped: a graph that allocates gigabytes or loops for ever, run in the
server, takes the server's memory or leaves a core spinning. Run here, it takes only the child,
which the kernel or the timeout ends. As the graph policy makes every shape a function of the
batch size alone, the largest batch costs the most any request can; a graph that answers NaN
or infinity for any of the images fails. Synthetic images alone miss a graph whose answer or
cost hinges on what only real CAPTCHAs look like, hence the frozen-set batch: the server reads
its sample (`captchaops.serving.frozen_sample`) and hands the bytes to the child as files in
its working directory; a scheme without a frozen set is tried on the synthetic images alone.
The child runs isolated (`python -I`, a fresh working directory, an environment without the
service's secrets). The server opens the version itself only after the child succeeded. Run as
`python -I -m captchaops.serving.trial FOLDER MEMORY_BYTES CPU_SECONDS MAX_BATCH [SAMPLE_DIR]`.
"""

from __future__ import annotations

import io
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from captchaops.model.version import check_model_dir, open_version

if TYPE_CHECKING:
    from captchaops.settings import Settings


class ImageModel(Protocol):
    """What a server needs from a loaded version."""

    meta: dict[str, Any]

    def predict_images(self, images: list[bytes]) -> list[dict[str, Any]]:
        """Text and confidence for each image."""
        ...


class TrialFailed(Exception):
    """The version failed its trial; the message is one line saying why. `lasting` is False
    when the failure says more about the machine than the network (the wall-clock timeout)."""

    def __init__(self, message: str, lasting: bool = True) -> None:
        super().__init__(message)
        self.lasting = lasting


VERSION_CPU_SECONDS = 30
"""CPU seconds the trial, and the server's own warm-up, may spend on a version
(`Settings.version_cpu_seconds`)."""
OUTPUT_BYTES = 64 * 1024
"""The most the trial's child may write to its stdout and stderr together, and all that is read."""
SAMPLE_DIR = "frozen-sample"
"""The folder, in the child's working directory, holding the frozen-set images it runs."""
CHILD_ENV_KEYS = ("PATH", "LANG", "LC_ALL", "TZ")
"""Variables the child inherits; the rest (credentials, tokens, MLflow settings) it never sees."""


@dataclass(frozen=True)
class TrialLimits:
    """What the child trying a version may use before it is stopped."""

    memory_bytes: int = 2**30
    """Address space (RLIMIT_AS): a few hundred MiB open and run our models."""
    cpu_seconds: int = VERSION_CPU_SECONDS
    wall_seconds: float = 90.0
    max_batch: int = 64
    """Images in the warm-up batch: the largest the server sends to a version."""

    @classmethod
    def for_settings(cls, settings: Settings) -> TrialLimits:
        """The limits `settings` give: its CPU budget, its largest batch."""
        cpu = int(settings.version_cpu_seconds)
        return cls(
            memory_bytes=int(settings.trial_memory_mib) * 2**20,
            cpu_seconds=cpu,
            wall_seconds=3.0 * cpu,
            max_batch=int(settings.max_batch_images),
        )


class NonFiniteOutput(RuntimeError):
    """A version answered NaN or infinity: it is refused, never served."""


def warm_up(model: ImageModel, batch: int = 1, frozen: Sequence[bytes] = ()) -> None:
    """Run a batch of `batch` white, one of black and one of noise images of the model's input
    size, then one of the `frozen` (frozen-set) images, repeated or cut to `batch`; raise if any
    answer or raw output is missing, out of range or not finite."""
    for probe in _probes(model.meta):
        _check_answers(model, [probe] * batch, "a white, black or noise image")
    if frozen:
        filled = [frozen[i % len(frozen)] for i in range(batch)]
        _check_answers(model, filled, "an image of the scheme's frozen evaluation set")


def _check_answers(model: ImageModel, images: list[bytes], what: str) -> None:
    result = model.predict_images(images)
    if len(result) != len(images) or not all(isinstance(r.get("text"), str) for r in result):
        raise RuntimeError(f"warm-up prediction returned {result[:3]!r}, not a text per image")
    for answer in result:
        confidence = answer.get("confidence")
        if not isinstance(confidence, int | float) or not math.isfinite(confidence):
            raise NonFiniteOutput(
                f"the version answered the confidence {confidence!r} for {what}; "
                "versions whose outputs are not finite numbers are refused"
            )
        if not 0.0 <= float(confidence) <= 1.0:
            raise RuntimeError(f"warm-up confidence {confidence!r} is not between 0 and 1")
    tensor, outputs = getattr(model, "tensor", None), getattr(model, "member_outputs", None)
    if callable(tensor) and callable(outputs):
        for raw in outputs(tensor(images), probabilities=False):
            if not np.isfinite(np.asarray(raw, dtype=np.float64)).all():
                raise NonFiniteOutput(
                    f"the version's output holds NaN or infinity for {what}; "
                    "versions whose outputs are not finite numbers are refused"
                )


def _probes(meta: dict[str, Any]) -> list[bytes]:
    """PNG bytes of a white, a black and a (seeded) noise image of the model's input size."""
    width, height = int(meta["width"]), int(meta["height"])
    noise = np.random.default_rng(0).integers(0, 256, (height, width), dtype=np.uint8)
    images = [Image.new("L", (width, height), 255), Image.new("L", (width, height), 0)]
    images.append(Image.fromarray(noise, "L"))
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def run_trial(folder: Path, limits: TrialLimits, frozen: Sequence[bytes] = ()) -> list[str]:
    """Check, open and warm up the version in `folder` in a limited, isolated child, with the
    `frozen` images (at most a batch of them) beside the synthetic ones; returns its op set.
    Raises TrialFailed with the reason (policy, NaN, memory, CPU or time) when it fails."""
    command = [
        sys.executable,
        "-I",  # no PYTHON* variables, no user site, no script folder on the path
        "-m",
        "captchaops.serving.trial",
        str(folder.resolve()),
        str(limits.memory_bytes),
        str(limits.cpu_seconds),
        str(limits.max_batch),
    ]
    with tempfile.TemporaryDirectory(prefix="captchaops-trial-") as workdir:
        if frozen:
            command.append(SAMPLE_DIR)
            sample = Path(workdir, SAMPLE_DIR)
            sample.mkdir()
            for i, image in enumerate(frozen[: limits.max_batch]):
                (sample / f"{i:04d}").write_bytes(image)
        out_path, err_path = Path(workdir, "stdout"), Path(workdir, "stderr")
        with out_path.open("wb") as out, err_path.open("wb") as err:
            child = subprocess.Popen(
                command, stdout=out, stderr=err, cwd=workdir, env=child_environment()
            )
            try:
                returncode = child.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired as exc:
                child.kill()
                child.wait()
                raise TrialFailed(
                    f"trying the version took longer than {limits.wall_seconds:g} s; it was stopped",
                    lasting=False,
                ) from exc
        stdout, stderr = _head(out_path), _head(err_path)
    lines = stdout.decode(errors="replace").strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else {}
    except ValueError:
        report = {}
    if not isinstance(report, dict):
        report = {}
    if returncode == 0 and isinstance(report.get("ops"), list):
        return [str(op) for op in report["ops"]]
    if "error" in report:
        raise TrialFailed(str(report["error"]))
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        raise TrialFailed(
            f"trying the version used more than {limits.cpu_seconds} s of CPU; it was stopped"
        )
    if returncode == -signal.SIGXFSZ:
        raise TrialFailed(
            f"trying the version wrote more than {OUTPUT_BYTES // 1024} KiB of output"
        )
    tail = " ".join(stderr.decode(errors="replace").split())[-200:]
    memory = limits.memory_bytes // 2**20
    why = f", likely over {memory} MiB of memory" if "alloc" in tail.lower() else ""
    raise TrialFailed(f"trying the version failed (exit {returncode}{why}): {tail}")


def child_environment() -> dict[str, str]:
    """The trial child's whole environment: a few neutral variables and one thread each."""
    env = {k: os.environ[k] for k in CHILD_ENV_KEYS if k in os.environ}
    return env | {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _head(path: Path) -> bytes:
    """At most OUTPUT_BYTES of what the child wrote to `path`."""
    with path.open("rb") as fh:
        return fh.read(OUTPUT_BYTES)


def _trial(folder: Path, max_batch: int, frozen: Sequence[bytes] = ()) -> list[str]:
    """In the child: the checks, the graph policy, opening and warm-up; the op set."""
    # here, not at the top: it loads onnx (~24 MB, 0.7 s), which the model server, importing this
    # module to start trials, never needs (it opens versions with check_ops=False)
    from captchaops.model.graph_policy import check_graph, input_geometry

    meta, onnx = check_model_dir(folder)
    ops = check_graph(onnx, geometry=input_geometry(meta), max_batch=max_batch)
    if meta.onnx_ops and sorted(meta.onnx_ops) != ops:
        raise TrialFailed("the graph's operators differ from those meta.json records")
    warm_up(open_version(folder, check_ops=False), max_batch, frozen)
    return ops


def _read_sample(folder: Path | None, max_batch: int) -> list[bytes]:
    """In the child: the frozen-set images the server wrote to `folder`, in order."""
    if folder is None:
        return []
    return [path.read_bytes() for path in sorted(folder.iterdir())[:max_batch]]


def _main(argv: list[str]) -> int:
    folder, memory, cpu, batch = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    sample = Path(argv[4]) if len(argv) > 4 else None
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_BYTES, OUTPUT_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        report: dict[str, Any] = {"ops": _trial(folder, batch, _read_sample(sample, batch))}
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
