"""What runs inside a decoding worker process: the kernel's limits, and a few images checked,
decoded and resized into one uint8 buffer.

It stands apart from `captchaops.serving` so that a worker imports only this module,
`preprocess`, numpy and Pillow (the serving package would bring the whole server). The parent
(`captchaops.serving.decoding`) starts workers with `limit_worker` as their initializer and runs
`decode_images` in them on a few images of one or several requests at a time; a worker that
overruns is ended by the kernel, never by itself:
- every image gets `cpu_seconds` of CPU from an ITIMER_PROF timer, whose SIGPROF ends the process
  (its default action; no handler is installed, so a decoder busy in C cannot delay it);
- every call gets RLIMIT_CPU's soft limit one second past the call's whole budget (SIGXCPU);
- the address space (RLIMIT_AS) allows `memory_bytes` beyond what the worker maps at its start,
  so an allocation past it fails with MemoryError, answered as a refusal.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import threading
import time

import numpy as np
from PIL import Image

from captchaops.model.preprocess import (
    InvalidImage,
    TooCostly,
    TooManyPixels,
    check_size,
    decode,
    to_pixels,
)

PLUGINS = tuple(f"PIL.{name}ImagePlugin" for name in ("Png", "Jpeg", "Gif", "Bmp"))
"""Pillow's readers of the four formats, imported before a worker's first image (not in its
CPU time)."""

Refusal = tuple[int, str, str]
"""(HTTP status, error code, one-line detail) for an image the worker refuses; the parent puts
the image's number in the request in front of the detail."""


def refusal_of(exc: InvalidImage) -> tuple[int, str]:
    """The HTTP status and error code for an image `preprocess` refuses."""
    if isinstance(exc, TooManyPixels):
        return 400, "too_many_pixels"
    if isinstance(exc, TooCostly):
        return 400, "too_costly"
    return 400, "invalid_image"


def limit_worker(memory_bytes: int, server_pid: int = 0) -> None:
    """The initializer of a decoding worker: end it when the server `server_pid` is gone, cap
    its address space at what it maps now plus `memory_bytes`, and make sure SIGPROF and SIGXCPU
    end it."""
    if server_pid:  # before the address-space cap: the thread's stack is mapped now
        threading.Thread(target=_follow, args=(server_pid,), daemon=True).start()
    with open("/proc/self/statm") as statm:
        mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = mapped + memory_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    Image.preinit()  # registers the plugins: otherwise the first image's CPU time pays for it
    signal.signal(signal.SIGPROF, signal.SIG_DFL)
    signal.signal(signal.SIGXCPU, signal.SIG_DFL)


def _follow(server_pid: int) -> None:
    """End this worker once its server is gone. A worker's parent is the forkserver, not the
    server, so a server killed outright (SIGKILL, the OOM killer) would otherwise leave the
    workers, and through the pipes they hold the forkserver and resource tracker, running."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(server_pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:  # the pid now belongs to another account's process
            os._exit(0)


def _cpu_used() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def decode_images(
    images: list[bytes],
    height: int,
    width: int,
    channels: int,
    max_pixels: int,
    cpu_seconds: float,
) -> tuple[np.ndarray, dict[int, Refusal]]:
    """The images as uint8[N, height, width, channels], each within `cpu_seconds` of CPU, and
    the refusal of each image that cannot be used, by its place in `images` (its pixels left
    zero): the images may come from several requests, and each is answered on its own."""
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    budget = math.ceil(_cpu_used() + cpu_seconds * len(images)) + 1
    unlimited = hard == resource.RLIM_INFINITY
    resource.setrlimit(resource.RLIMIT_CPU, (budget if unlimited else min(budget, hard), hard))
    out = np.zeros((len(images), height, width, channels), dtype=np.uint8)
    refused: dict[int, Refusal] = {}
    for index, data in enumerate(images):
        signal.setitimer(signal.ITIMER_PROF, cpu_seconds)
        try:
            check_size(data, max_pixels)
            with decode(data, max_pixels) as image:
                out[index] = to_pixels(image, height, width, channels)
        except InvalidImage as exc:
            refused[index] = (*refusal_of(exc), str(exc))
        except MemoryError:
            refused[index] = (
                413,
                "too_costly",
                "decoding it needs more memory than a worker may use; send a smaller image",
            )
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
    return out, refused
