"""Image decoding in worker processes that the kernel bounds, beside the model, not inside it.

A decoder is a C library fed bytes from anyone: checks in front of it fail closed, but what they
let through must still cost at most what the kernel allows. Each worker is a one-process
`ProcessPoolExecutor` (forkserver: a clean process, not a fork of a threaded server) whose
initializer caps its memory, and every image runs under a CPU timer whose signal ends the
worker (`captchaops.model.decode_worker`). A worker runs one chunk of one request at a time, so
when it dies the chunk that killed it is known: that request gets a 422 and the worker is
replaced in the background, while other requests wait for the other workers. Workers are taken
first come, first served, a few images at a time, so one large request cannot hold them all.
Pixels come back as one uint8 buffer per chunk (a quarter of the floats' bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from multiprocessing import forkserver
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from captchaops.model import decode_worker
from captchaops.model.reader import contract_of
from captchaops.serving.protocol import ProtocolError
from captchaops.serving.trial import ImageModel

log = logging.getLogger(__name__)

CHUNK_IMAGES = 8
"""Images one request sends to a worker at a time (its turn; then the next waiting request's)."""
WALL_SLACK_S = 2.0
"""Wall time a chunk may take beyond its CPU budget (the worker shares the cores) before the
worker is killed."""


@dataclass(frozen=True)
class DecodeLimits:
    """What decoding may cost."""

    workers: int = 2
    cpu_seconds: float = 0.5
    """CPU time per image; beyond it the kernel ends the worker and the request gets a 422."""
    memory_bytes: int = 256 * 2**20
    """Address space a worker may map beyond what it maps when it starts."""
    max_pixels: int = 1_000_000


@dataclass(frozen=True)
class Geometry:
    """The size a version's network reads: height, width and channels (1 grey, 3 RGB)."""

    height: int
    width: int
    channels: int


@dataclass
class _Worker:
    executor: ProcessPoolExecutor
    pid: int


@dataclass(eq=False)
class _Piece:
    """Up to CHUNK_IMAGES images of one request, numbered from `first` in it."""

    images: list[bytes]
    geometry: Geometry
    first: int
    future: asyncio.Future[np.ndarray]
    alone: bool = False
    """Run in a call of its own: a call it shared ended its worker."""


class Decoders:
    """A few decoding worker processes, each bounded by the kernel, fed in arrival order."""

    _running: ClassVar[set[Decoders]] = set()  # pools started and not stopped, in this process

    def __init__(self, limits: DecodeLimits) -> None:
        self.limits = limits
        self._context = multiprocessing.get_context("forkserver")
        # The forkserver imports the worker's modules once; each worker forks from it.
        self._context.set_forkserver_preload([decode_worker.__name__, *decode_worker.PLUGINS])
        self._queue: deque[_Piece] = deque()
        self._queued = asyncio.Event()
        self._slots: list[asyncio.Task[None]] = []
        self._workers: dict[int, _Worker] = {}
        self.replaced = 0

    async def start(self) -> None:
        """Start every worker, wait until each has answered once, and start feeding them."""
        self._queued = asyncio.Event()
        Decoders._running.add(self)
        started = await asyncio.gather(*(self._new_worker() for _ in range(self.limits.workers)))
        self._slots = [asyncio.create_task(self._slot(worker)) for worker in started]

    async def stop(self) -> None:
        """End every worker, idle or busy; waiting images are cancelled."""
        for task in self._slots:
            task.cancel()
        await asyncio.gather(*self._slots, return_exceptions=True)
        for worker in list(self._workers.values()):
            self._end(worker, kill=True)
        for piece in self._queue:
            piece.future.cancel()
        # The forkserver would end only once it notices this process is gone, a moment after
        # `captchaops down` returns; stopping it here leaves nothing of the server behind.
        # `_stop` is the standard library's own (its tests use it); absent, the server's exit
        # still ends it.
        # Only the last pool of this process stops it: `_stop` waits for the forkserver, which
        # lives while any worker of any pool does.
        Decoders._running.discard(self)
        stop_forkserver = getattr(forkserver._forkserver, "_stop", None)
        if stop_forkserver is not None and not Decoders._running:
            stop_forkserver()

    async def decode(self, images: list[bytes], geometry: Geometry) -> np.ndarray:
        """The images as uint8[N, H, W, C], or a ProtocolError naming the first refused image
        (400), or the image whose decoding the kernel stopped (422), or a 503 when the workers
        did not answer in time. At most one chunk of a request per worker waits at a time."""
        out = np.empty((len(images), geometry.height, geometry.width, geometry.channels), np.uint8)
        starts = iter(range(0, len(images), CHUNK_IMAGES))
        refused: dict[int, ProtocolError] = {}

        async def lane() -> None:
            for start in starts:
                if refused and start > min(refused):
                    return  # an earlier chunk was refused, and with it the request
                chunk = images[start : start + CHUNK_IMAGES]
                piece = _Piece(chunk, geometry, start, asyncio.get_running_loop().create_future())
                self._queue.append(piece)
                self._queued.set()
                try:
                    out[start : start + len(chunk)] = await piece.future
                except ProtocolError as exc:
                    refused[start] = exc
                    return

        lanes = [asyncio.ensure_future(lane()) for _ in range(min(self.limits.workers, len(out)))]
        try:
            await asyncio.gather(*lanes)
        finally:
            for task in lanes:
                task.cancel()
        if refused:  # the first refused image is named, whichever worker refused first
            raise refused[min(refused)]
        return out

    async def _take(self) -> list[_Piece]:
        """The next call's pieces: the first waiting one, then the ones behind it while they fit
        in CHUNK_IMAGES and share its geometry (several small requests share one call)."""
        while True:
            while not self._queue:
                self._queued.clear()
                await self._queued.wait()
            first = self._queue.popleft()
            if first.future.done():  # its request has gone
                continue
            taken, count = [first], len(first.images)
            while not first.alone and self._queue:
                piece = self._queue[0]
                if piece.future.done():
                    self._queue.popleft()
                    continue
                if piece.alone or piece.geometry != first.geometry:
                    break
                if count + len(piece.images) > CHUNK_IMAGES:
                    break
                taken.append(self._queue.popleft())
                count += len(piece.images)
            return taken

    async def _slot(self, worker: _Worker) -> None:
        """Feed one worker for ever, replacing it whenever it is ended."""
        while True:
            pieces = await self._take()
            died = await self._call(worker, pieces)
            if died is None:
                continue
            self._end(worker, kill=True)
            self.replaced += 1
            if len(pieces) > 1:  # which one ended it is unknown: each runs alone, first in line
                for piece in reversed(pieces):
                    piece.alone = True
                    self._queue.appendleft(piece)
                self._queued.set()
            elif not pieces[0].future.done():
                pieces[0].future.set_exception(died)
            worker = await self._new_worker(retry=True)

    async def _call(self, worker: _Worker, pieces: list[_Piece]) -> ProtocolError | None:
        """Run the pieces in one call and settle each; the refusal to give when the worker was
        ended (by the kernel, or killed after the wall-clock deadline), else None."""
        images = [image for piece in pieces for image in piece.images]
        geometry = pieces[0].geometry
        wall = WALL_SLACK_S + 2 * self.limits.cpu_seconds * len(images)
        try:
            future = worker.executor.submit(
                decode_worker.decode_images,
                images,
                geometry.height,
                geometry.width,
                geometry.channels,
                self.limits.max_pixels,
                self.limits.cpu_seconds,
            )
            pixels, refusals = await asyncio.wait_for(asyncio.wrap_future(future), wall)
        except TimeoutError:
            log.warning("decoding worker %d overran %.1f s of wall time", worker.pid, wall)
            return ProtocolError(
                503,
                "decode_timeout",
                f"the images were not decoded within {wall:g} s; retry shortly",
            )
        except BrokenProcessPool:
            log.warning("decoding worker %d was ended by its limits", worker.pid)
            return self._too_costly(pieces[0].first, len(images))
        except Exception:  # a worker that answers nonsense is replaced like one that died
            log.exception("decoding worker %d failed", worker.pid)
            return ProtocolError(503, "decode_failed", "the images could not be decoded; retry")
        at = 0
        for piece in pieces:
            size = len(piece.images)
            bad = sorted(i - at for i in refusals if at <= i < at + size)
            if piece.future.done():
                pass
            elif bad:
                status, error, detail = refusals[at + bad[0]]
                message = f"image {piece.first + bad[0]}: {detail}"
                piece.future.set_exception(ProtocolError(status, error, message))
            else:
                piece.future.set_result(pixels[at : at + size])
            at += size
        return None

    def _too_costly(self, first: int, count: int) -> ProtocolError:
        which = f"image {first}" if count == 1 else f"one of images {first}-{first + count - 1}"
        return ProtocolError(
            422,
            "too_costly",
            f"decoding {which} needed more than {self.limits.cpu_seconds:g} s of CPU or "
            f"{self.limits.memory_bytes // 2**20} MiB of memory; send a plainer or smaller image",
        )

    def _end(self, worker: _Worker, kill: bool) -> None:
        self._workers.pop(worker.pid, None)
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
        worker.executor.shutdown(wait=False, cancel_futures=True)

    async def _new_worker(self, retry: bool = False) -> _Worker:
        """Start one worker and wait for its first answer (its process id); a replacement that
        fails to start is tried again every second."""
        while True:
            executor = ProcessPoolExecutor(
                max_workers=1,
                mp_context=self._context,
                initializer=decode_worker.limit_worker,
                initargs=(self.limits.memory_bytes, os.getpid()),
            )
            try:
                with _main_not_imported():  # the process starts within this first submit
                    started = executor.submit(os.getpid)
                pid = await asyncio.wrap_future(started)
            except asyncio.CancelledError:
                # `stop` while this worker starts: it is in no list `stop` ends, and alive it
                # would keep the forkserver (which `stop` waits for) alive; shut down, it ends
                # once it has started
                executor.shutdown(wait=False, cancel_futures=True)
                raise
            except (BrokenProcessPool, OSError) as exc:
                executor.shutdown(wait=False, cancel_futures=True)
                if not retry:
                    raise
                log.warning("a decoding worker failed to start (%s); trying again", exc)
                await asyncio.sleep(1.0)
                continue
            worker = _Worker(executor, pid)
            self._workers[pid] = worker
            return worker


def geometry_of(meta: dict[str, Any]) -> Geometry:
    """The input size a version's meta.json declares."""
    channels = int(contract_of(meta)["channels"])
    return Geometry(int(meta["height"]), int(meta["width"]), channels)


@runtime_checkable
class PixelModel(Protocol):
    """A loaded version that reads decoded pixels (our reader, and what wraps it)."""

    meta: dict[str, Any]

    def predict_pixels(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        """Text and confidence for each image of uint8[N, H, W, C]."""
        ...


def reads_pixels(model: ImageModel) -> bool:
    """Whether a loaded version reads decoded pixels; any other model is handed the image bytes
    and decodes them itself."""
    return isinstance(model, PixelModel)


def read_decoded(model: ImageModel, images: Sequence[Any]) -> list[dict[str, Any]]:
    """A model's answers for a batch: uint8[H, W, C] pixels each (as `Decoders` returns them)
    for a model that `reads_pixels`, else image bytes."""
    if isinstance(model, PixelModel):
        return model.predict_pixels(np.stack(images))
    return model.predict_images(list(images))


@contextlib.contextmanager
def _main_not_imported() -> Iterator[None]:
    """Start processes that do not import the parent's main script. multiprocessing makes every
    new process import it (for functions defined there), unless the script runs as a package's
    `__main__` module: a worker then imports the server's whole command line (0.7 s, 46 MB,
    each time one is replaced) for nothing, as it runs only `decode_worker`'s functions."""
    main = sys.modules["__main__"]
    spec = main.__spec__
    main.__spec__ = ModuleSpec("__main__", None)
    try:
        yield
    finally:
        main.__spec__ = spec
