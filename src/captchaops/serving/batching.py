"""Micro-batching with turns: concurrent requests share model calls, and no request starves another.

Each request is a queue entry. A model call takes at most `quantum` images from each waiting
request in turn (round robin), within `max_images` images and `max_pixels` header-declared
pixels. Requests that have not had a turn yet go before those that have (at least every other
call serves a later turn, so big requests always move), so a one-image request arriving behind
four 64-image requests waits only for the model call already running. A request whose caller has
gone (deadline passed, client disconnected) is dropped before its next turn. An image is
whatever the `read` function takes: bytes for `predict_images`, or the uint8 pixels of
`serving.decoding` when decoding happens in worker processes before the request is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from captchaops.model.preprocess import InvalidImage
from captchaops.serving.trial import ImageModel
from captchaops.serving.watcher import ServedModel

Prediction = dict[str, Any]
Answer = tuple[ServedModel, list[Prediction]]
Outcome = list[Prediction] | BaseException
Read = Callable[[ImageModel, Sequence[Any]], list[Prediction]]
"""How a model call reads a batch's images (model, images) -> one prediction per image."""


def read_images(model: ImageModel, images: Sequence[Any]) -> list[Prediction]:
    """The default `Read`: images are encoded bytes, which the model decodes itself."""
    return model.predict_images(list(images))


class NoModel(Exception):
    """No version has been loaded yet."""


class Overloaded(Exception):
    """Too many images are already waiting."""


@dataclass(eq=False)
class _Job:
    """One request: its images, their pixel counts and how far it has been served."""

    images: Sequence[Any]
    pixels: list[int]
    future: asyncio.Future[Answer]
    queued_at: float
    predictions: list[Prediction | None] = field(init=False)
    served: ServedModel | None = None
    scheduled: int = 0
    answered: int = 0

    def __post_init__(self) -> None:
        self.predictions = [None] * len(self.images)


@dataclass(frozen=True)
class _Slice:
    """Images [start, stop) of one job, run in one model call."""

    job: _Job
    start: int
    stop: int


class MicroBatcher:
    """Runs queued requests through the current model, a few images of each request per call.

    A batch forms from what is queued, then waits up to `max_wait_s` for more while other
    requests are still being read or while it is smaller than the previous batch (under
    steady concurrent load, the same clients come back). A lone client never waits.
    """

    def __init__(
        self,
        current: Callable[[], ServedModel | None],
        max_images: int,
        max_wait_s: float,
        max_pending_images: int,
        observe_batch: Callable[[int], None],
        max_pixels: int = 1_000_000,
        quantum: int = 4,
        observe_queue: Callable[[float], None] = lambda seconds: None,
        observe_compute: Callable[[float], None] = lambda seconds: None,
        read: Read = read_images,
    ) -> None:
        self.current = current
        self.read = read
        self.max_images = max_images
        self.max_pixels = max_pixels
        self.quantum = quantum
        self.max_wait_s = max_wait_s
        self.max_pending_images = max_pending_images
        self.observe_batch = observe_batch
        self.observe_queue = observe_queue
        self.observe_compute = observe_compute
        self._fresh: deque[_Job] = deque()
        self._turns: deque[_Job] = deque()
        self._turns_due = False
        self.pending_images = 0
        self._arriving = 0
        self._last_batch = 1
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the batching loop (one batch at a time, in one thread) on the running loop."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop batching; waiting requests are cancelled."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        for job in [*self._fresh, *self._turns]:
            job.future.cancel()

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request as on its way (being read), so a forming batch waits for it."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            self._arrived.set()

    async def predict(
        self,
        images: Sequence[Any],
        pixels: list[int] | None = None,
        served: ServedModel | None = None,
    ) -> Answer:
        """Predictions for `images` (with their header pixel counts) and the version that made them:
        `served` when given (a canary), else the current one.

        Cancelling the caller drops the images not yet run.
        """
        if served is None and self.current() is None:
            raise NoModel
        if self.pending_images + len(images) > self.max_pending_images:
            raise Overloaded
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Answer] = loop.create_future()
        job = _Job(images, pixels or [0] * len(images), future, loop.time(), served=served)
        future.add_done_callback(lambda _: self._release(job))
        self._fresh.append(job)
        self.pending_images += len(images)
        self._arrived.set()
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            self.observe_batch(sum(piece.stop - piece.start for piece in batch))
            now = loop.time()
            for piece in batch:
                if piece.start == 0:
                    self.observe_queue(now - piece.job.queued_at)
            outcomes, seconds = await loop.run_in_executor(self._executor, self._timed_run, batch)
            self.observe_compute(seconds)
            for piece, outcome in zip(batch, outcomes, strict=True):
                self._settle(piece, outcome)

    async def _collect(self) -> list[_Slice]:
        while not (self._fresh or self._turns):
            self._arrived.clear()
            await self._arrived.wait()
        batch: list[_Slice] = []
        self._fill(batch)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        expected = min(self.max_images, self._last_batch)
        while batch and not self._full(batch):
            if self._count(batch) >= expected and self._arriving == 0:
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
            self._fill(batch)
        self._last_batch = max(1, self._count(batch))
        self._turns_due = not any(piece.start > 0 for piece in batch)
        return batch

    @staticmethod
    def _count(batch: list[_Slice]) -> int:
        return sum(piece.stop - piece.start for piece in batch)

    @staticmethod
    def _pixels(batch: list[_Slice]) -> int:
        return sum(sum(piece.job.pixels[piece.start : piece.stop]) for piece in batch)

    def _full(self, batch: list[_Slice]) -> bool:
        return self._count(batch) >= self.max_images or self._pixels(batch) >= self.max_pixels

    def _fill(self, batch: list[_Slice]) -> None:
        """Give waiting jobs turns while the batch has room: jobs that have not had a turn yet
        first, then the rest in order; but when the previous batch served no second turn, the
        longest-waiting job goes first, so a stream of new small jobs cannot stall a big one."""
        if not batch and self._turns and self._turns_due:
            self._turn(self._turns, batch)
        while self._fresh or self._turns:
            if not self._turn(self._fresh or self._turns, batch):
                return

    def _turn(self, queue: deque[_Job], batch: list[_Slice]) -> bool:
        """Up to `quantum` images of the job first in `queue` into the batch; False when full."""
        count, pixels = self._count(batch), self._pixels(batch)
        if count >= self.max_images or pixels >= self.max_pixels:
            return False
        job = queue.popleft()
        if job.future.done() or not self._assign(job):
            self._release(job)
            return True
        stop = job.scheduled
        while stop < len(job.images) and stop - job.scheduled < self.quantum:
            more = job.pixels[stop]
            if count >= self.max_images or (count and pixels + more > self.max_pixels):
                break
            count, pixels, stop = count + 1, pixels + more, stop + 1
        if stop == job.scheduled:
            queue.appendleft(job)  # no room left: it goes first next time
            return False
        batch.append(_Slice(job, job.scheduled, stop))
        self.pending_images -= stop - job.scheduled
        job.scheduled = stop
        if job.scheduled < len(job.images):
            self._turns.append(job)
        return True

    def _release(self, job: _Job) -> None:
        """Stop counting a finished, failed or abandoned job's unscheduled images as waiting."""
        self.pending_images -= len(job.images) - job.scheduled
        job.scheduled = len(job.images)

    def _assign(self, job: _Job) -> bool:
        """Pin the job to the version serving now, so all its images get one version."""
        if job.served is None:
            job.served = self.current()
        if job.served is None:
            job.future.set_exception(NoModel())
            return False
        return True

    def _settle(self, piece: _Slice, outcome: Outcome) -> None:
        job = piece.job
        if job.future.done():
            return
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
            return
        job.predictions[piece.start : piece.stop] = outcome
        job.answered += piece.stop - piece.start
        if job.answered == len(job.images) and job.served is not None:
            job.future.set_result((job.served, [p for p in job.predictions if p is not None]))

    def _timed_run(self, batch: list[_Slice]) -> tuple[list[Outcome], float]:
        started = time.perf_counter()
        outcomes = self._run(batch)
        return outcomes, time.perf_counter() - started

    def _run(self, batch: list[_Slice]) -> list[Outcome]:
        """One model call per version in the batch; a failed call is retried slice by slice."""
        outcomes: dict[int, Outcome] = {}
        groups: dict[int, list[int]] = {}
        for position, piece in enumerate(batch):
            groups.setdefault(id(piece.job.served), []).append(position)
        for positions in groups.values():
            pieces = [batch[p] for p in positions]
            served = pieces[0].job.served
            assert served is not None
            images = [
                image for piece in pieces for image in piece.job.images[piece.start : piece.stop]
            ]
            try:
                predictions = self.read(served.model, images)
            except Exception:
                for position, piece in zip(positions, pieces, strict=True):
                    outcomes[position] = self._run_alone(served, piece)
                continue
            start = 0
            for position, piece in zip(positions, pieces, strict=True):
                size = piece.stop - piece.start
                outcomes[position] = predictions[start : start + size]
                start += size
        return [outcomes[position] for position in range(len(batch))]

    def _run_alone(self, served: ServedModel, piece: _Slice) -> Outcome:
        try:
            return self.read(served.model, piece.job.images[piece.start : piece.stop])
        except InvalidImage as exc:
            return InvalidImage(_shift_index(str(exc), piece.start))
        except Exception as exc:
            return exc


def _shift_index(message: str, offset: int) -> str:
    """Renumber the 'image N' a slice's error names to its place in the whole request."""
    match = re.match(r"image (\d+)", message)
    if not match or not offset:
        return message
    return f"image {int(match.group(1)) + offset}{message[match.end() :]}"
