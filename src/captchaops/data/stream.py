"""Fresh synthetic CAPTCHAs while training: worker processes draw shards, the loop samples batches.

Drawing a CAPTCHA is `captcha`'s Python code, so it runs in worker processes
(`concurrent.futures.ProcessPoolExecutor`, spawned) that overlap the optimiser steps instead of
drawing a whole set before the first one. Sample i depends only on (seed, i), exactly as in
`synthetic.generate`; the training stream starts at index `first`, so the fixed validation and
test images (indices below `first`) are never trained on, by construction.

Batches come from a pool of the latest `capacity` training images, in passes: each pass is a
random order of the pool as it stands when the pass begins (without replacement, as `fit`
goes through shuffled arrays). Step t admits shards until
`1 + t * batch / (reuse * shard)` have arrived, so each image is used `reuse` times on average
and the batch at step t depends only on the seed: a late shard costs waiting time, never a
different batch. Memory is bounded by the pool plus `window` shards in flight.

With `fill_steps` the stream draws one pool and no more: every shard is queued at once (the
workers draw as fast as they can, beside the optimiser steps) and step t admits
`1 + t * shards // fill_steps` of them, so the whole pool is in by step `fill_steps` and
training then samples it like a fixed set. This is the fixed set drawn first, without the
minute of waiting before the first step; batches still depend only on the seed.

Training pulls the batches on its own thread (`training.loop.fit_stream`, not `tf.data`'s
prefetch thread), but nothing here assumes it: batches may be pulled on another thread than
the one that queues held-out sets, so every change to the queue of shards is made under one
lock; and the batches end when training does (`end_training`): a thread waiting in `batches`
for a shard leaves within `POLL_S`.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from types import TracebackType

import numpy as np

from captchaops.data import synthetic
from captchaops.model.ctc import encode_labels

POLL_S = 0.1  # how often a wait for a shard looks whether training has ended


@dataclass(frozen=True)
class Spec:
    """What the generator draws and the network input it is preprocessed to."""

    seed: int
    alphabet: str
    length: tuple[int, int]
    height: int
    width: int


@dataclass
class Shard:
    """Consecutive samples [start, start + n): network inputs, labels and (if asked) PNG bytes."""

    start: int
    x: np.ndarray
    labels: list[str]
    images: list[bytes] = field(default_factory=list)


def draw_shard(spec: Spec, start: int, stop: int, keep_images: bool) -> Shard:
    """Samples [start, stop) of `spec.seed`, preprocessed (runs in a worker process)."""
    samples = synthetic.generate_range(
        start,
        stop,
        spec.seed,
        spec.alphabet,
        spec.length,
        preprocess_to=(spec.height, spec.width),
    )
    x = np.stack([s.array for s in samples if s.array is not None])
    images = [s.image for s in samples] if keep_images else []
    return Shard(start, x, [s.label for s in samples], images)


def join(shards: list[Shard]) -> Shard:
    """One shard from consecutive shards."""
    return Shard(
        shards[0].start,
        np.concatenate([s.x for s in shards]),
        [label for s in shards for label in s.labels],
        [image for s in shards for image in s.images],
    )


class FreshImages:
    """An endless, seeded stream of training batches drawn from freshly generated CAPTCHAs.

    Use as a context manager: entering starts the workers (and their first shards), leaving
    stops them. `held_out` draws fixed sets on the same workers.
    """

    def __init__(
        self,
        spec: Spec,
        *,
        batch: int,
        first: int,
        capacity: int,
        reuse: float,
        workers: int,
        shard: int = 256,
        window: int | None = None,
        fill_steps: int | None = None,
        niceness: int = 0,
    ) -> None:
        if reuse <= 0 or batch < 1 or workers < 1 or shard < 1:
            raise ValueError("need reuse > 0 and at least one worker, image per batch and shard")
        if fill_steps is not None and fill_steps < 1:
            raise ValueError("fill_steps must be at least 1")
        self.spec, self.batch, self.first, self.shard = spec, batch, first, shard
        self.capacity = max(1, math.ceil(capacity / shard)) * shard
        self.fresh_per_step = batch / reuse
        self.fill_steps = fill_steps
        self.workers, self.niceness = workers, niceness
        self.window = window or 2 * workers
        self.x = np.empty((self.capacity, spec.height, spec.width, 1), dtype=np.float32)
        self.y = np.empty((self.capacity, spec.length[1]), dtype=np.int32)
        self.admitted = 0  # shards in the pool so far
        self.waited = 0.0  # seconds the training loop waited for a shard
        self._pending: deque[Future[Shard]] = deque()
        self._submitted = 0
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.RLock()  # the shard queue: fit's prefetch thread and the main one
        self._ended = threading.Event()  # training is over: `batches` ends at its next step
        self._idle = threading.Event()  # no thread is inside `batches` between two yields
        self._idle.set()

    def __enter__(self) -> FreshImages:
        self._pool = ProcessPoolExecutor(
            self.workers,
            mp_context=get_context("spawn"),
            initializer=os.nice,  # drawing yields to the optimiser steps when both want a core
            initargs=(self.niceness,),
        )
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """End the batches and stop the workers (joined); shards still queued are dropped."""
        self.end_training()
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def end_training(self, wait_s: float = 10.0) -> bool:
        """Training is over: `batches` ends (a thread waiting in it for a shard leaves within
        `POLL_S`; this waits up to `wait_s` for that) and the training shards not yet started
        are cancelled, so that held-out sets queued behind them (a one-fill pool queues all
        of itself at once) start at once. Returns whether no thread is inside `batches`."""
        self._ended.set()
        with self._lock:
            for future in self._pending:
                future.cancel()
            self._pending.clear()
        return self._idle.wait(wait_s)

    def held_out(self, start: int, stop: int, keep_images: bool = False) -> list[Future[Shard]]:
        """Queue samples [start, stop) (below `first`) on the workers, in chunks of 500."""
        if stop > self.first:
            raise ValueError("held-out samples must lie below the training stream's first index")
        with self._lock:
            return [
                self._executor().submit(draw_shard, self.spec, s, min(s + 500, stop), keep_images)
                for s in range(start, stop, 500)
            ]

    def start(self, shards: int | None = None) -> None:
        """Queue training shards up to `shards` in flight (default: the whole window)."""
        with self._lock:
            while len(self._pending) < min(shards or self.window, self.window) and self._more():
                self._submit_next()

    def fill(self) -> None:
        """With `fill_steps`: queue every shard of the pool not yet queued."""
        with self._lock:
            while self.fill_steps and self._more():
                self._submit_next()

    @property
    def total(self) -> int | None:
        """Training shards ever drawn: the pool's, with `fill_steps`; None: no end."""
        return self.capacity // self.shard if self.fill_steps else None

    @property
    def generated(self) -> int:
        """Training images admitted to the pool so far."""
        return self.admitted * self.shard

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(x, y) batches for steps 0, 1, 2, ... until `end_training`; the same seed gives the
        same batches."""
        rng = np.random.default_rng((self.spec.seed, 23))
        order, at = np.empty(0, dtype=np.int64), 0
        for step in itertools.count():
            self._idle.clear()
            try:
                if self._ended.is_set():
                    return
                if self.fill_steps:
                    pool = self.capacity // self.shard
                    needed = min(pool, 1 + step * pool // self.fill_steps)
                else:
                    needed = 1 + int(step * self.fresh_per_step // self.shard)
                while self.admitted < needed:
                    if not self._admit():
                        return
                if at + self.batch > len(order):  # a new pass over the pool as it stands now
                    n = min(self.capacity, self.generated)
                    order, at = (
                        np.concatenate([rng.permutation(n) for _ in range(-(-self.batch // n))]),
                        0,
                    )
                rows = order[at : at + self.batch]
                at += self.batch
                batch = self.x[rows], self.y[rows]
            finally:
                self._idle.set()
            yield batch

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            raise RuntimeError("FreshImages is used outside its `with` block")
        return self._pool

    def _more(self) -> bool:
        """Whether another training shard is to be drawn (until training ends, unless the pool
        is one fill and all of it is queued)."""
        if self._ended.is_set():
            return False
        return not self.fill_steps or self._submitted < self.capacity // self.shard

    def _submit_next(self) -> None:
        start = self.first + self._submitted * self.shard
        future = self._executor().submit(draw_shard, self.spec, start, start + self.shard, False)
        self._pending.append(future)
        self._submitted += 1

    def _admit(self) -> bool:
        """Put the next training shard in the pool (waiting for it); False: training ended."""
        with self._lock:
            if self._ended.is_set():
                return False
            if not self._pending:
                self.start()
            future = self._pending.popleft()
        began = time.monotonic()
        while not wait([future], timeout=POLL_S).done:
            if self._ended.is_set():
                return False
        if future.cancelled():
            return False
        shard = future.result()
        self.waited += time.monotonic() - began
        with self._lock:
            if not self.fill_steps and self._more():
                self._submit_next()
        slot = (self.admitted * self.shard) % self.capacity
        self.x[slot : slot + self.shard] = shard.x
        self.y[slot : slot + self.shard] = encode_labels(
            shard.labels, self.spec.alphabet, self.spec.length[1]
        )
        self.admitted += 1
        return True
