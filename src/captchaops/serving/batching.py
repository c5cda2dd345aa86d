"""Micro-batching: concurrent requests share one model call, with a bounded wait and batch size."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from captchaops.model.preprocess import InvalidImage
from captchaops.serving.watcher import ServedModel

Prediction = dict[str, Any]


class NoModel(Exception):
    """No version has been loaded yet."""


class Overloaded(Exception):
    """Too many images are already waiting."""


@dataclass
class _Job:
    images: list[bytes]
    future: asyncio.Future[tuple[ServedModel, list[Prediction]]]


class MicroBatcher:
    """Runs queued requests through the current model in batches of at most `max_images` images.

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
    ) -> None:
        self.current = current
        self.max_images = max_images
        self.max_wait_s = max_wait_s
        self.max_pending_images = max_pending_images
        self.observe_batch = observe_batch
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._pending_images = 0
        self._arriving = 0
        self._last_batch = 1
        self._arrived = asyncio.Event()
        self._carry: _Job | None = None
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

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request as on its way (being read), so a forming batch waits for it."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            self._arrived.set()

    async def predict(self, images: list[bytes]) -> tuple[ServedModel, list[Prediction]]:
        """Predictions for `images` and the model version that made them."""
        if self.current() is None:
            raise NoModel
        if self._pending_images + len(images) > self.max_pending_images:
            raise Overloaded
        future: asyncio.Future[tuple[ServedModel, list[Prediction]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending_images += len(images)
        self._queue.put_nowait(_Job(images, future))
        self._arrived.set()
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            count = self._count(jobs)
            self._pending_images -= count
            self.observe_batch(count)
            outcomes = await loop.run_in_executor(self._executor, self._run, jobs)
            for job, outcome in zip(jobs, outcomes, strict=True):
                if job.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    async def _collect(self) -> list[_Job]:
        first = self._carry or await self._queue.get()
        self._carry = None
        jobs = [first]
        self._drain(jobs)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        expected = min(self.max_images, self._last_batch)
        while self._carry is None and self._count(jobs) < self.max_images:
            if self._count(jobs) >= expected and self._arriving == 0:
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
            self._drain(jobs)
        self._last_batch = self._count(jobs)
        return jobs

    @staticmethod
    def _count(jobs: list[_Job]) -> int:
        return sum(len(job.images) for job in jobs)

    def _drain(self, jobs: list[_Job]) -> None:
        count = self._count(jobs)
        while self._carry is None and not self._queue.empty():
            job = self._queue.get_nowait()
            if count + len(job.images) > self.max_images:
                self._carry = job
                return
            jobs.append(job)
            count += len(job.images)

    def _run(self, jobs: list[_Job]) -> list[tuple[ServedModel, list[Prediction]] | BaseException]:
        served = self.current()
        if served is None:
            return [NoModel() for _ in jobs]
        images = [image for job in jobs for image in job.images]
        try:
            predictions = self._predict(served, images)
        except Exception as exc:
            if len(jobs) == 1:
                return [exc]
            return [self._run_alone(served, job) for job in jobs]
        outcomes: list[tuple[ServedModel, list[Prediction]] | BaseException] = []
        start = 0
        for job in jobs:
            outcomes.append((served, predictions[start : start + len(job.images)]))
            start += len(job.images)
        return outcomes

    def _run_alone(
        self, served: ServedModel, job: _Job
    ) -> tuple[ServedModel, list[Prediction]] | BaseException:
        try:
            return served, self._predict(served, job.images)
        except Exception as exc:
            return exc

    def _predict(self, served: ServedModel, images: list[bytes]) -> list[Prediction]:
        """One model call per `max_images` images, so memory stays bounded for big requests."""
        step = self.max_images
        predictions: list[Prediction] = []
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            try:
                predictions += served.model.predict_images(chunk)
            except InvalidImage as exc:
                raise InvalidImage(_shift_index(str(exc), start)) from exc
        return predictions


def _shift_index(message: str, offset: int) -> str:
    """Renumber the 'image N' a chunk's error names to its place in the whole request."""
    match = re.match(r"image (\d+)", message)
    if not match or not offset:
        return message
    return f"image {int(match.group(1)) + offset}{message[match.end() :]}"
