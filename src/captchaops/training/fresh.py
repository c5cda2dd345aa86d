"""The synthetic presets' data: fixed validation and test sets, and fresh training images.

MLflow-free like the loop. Samples [0, n_val) are the validation set and [n_val, n_val +
n_test) the test set, both fixed by the seed; the training stream draws from index n_val +
n_test on (`captchaops.data.stream`), so neither fixed set is ever trained on. The validation
set is drawn first (the loop needs it at the first epoch's end); the test set is drawn on the
same workers while training runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

from captchaops.data.dataset import DataError, LabelledImages
from captchaops.data.stream import FreshImages, Shard, Spec, join
from captchaops.model.crnn import Architecture
from captchaops.model.ctc import encode_labels
from captchaops.training.config import TrainConfig
from captchaops.training.loop import Stream, Validation


@dataclass
class FreshData:
    """The fixed held-out sets (drawn while training starts) and the fresh training stream."""

    images: FreshImages
    alphabet: str
    max_length: int
    n_val: int
    n_test: int
    capacity: int  # training images in the pool, as asked (the stream rounds up to whole shards)
    val_parts: list[Future[Shard]] = field(default_factory=list)
    test_parts: list[Future[Shard]] = field(default_factory=list)
    _val: Shard | None = None

    def stream(self, steps_per_epoch: int) -> Stream:
        """The training batches for `fit`, `steps_per_epoch` steps between validations."""
        images = self.images
        return Stream(
            images.batches(),
            steps_per_epoch,
            lambda: images.generated,
            self.queue_rest,
            steady_from=images.fill_steps or 0,
            end=images.end_training,
        )

    def queue_rest(self) -> None:
        """Queue the validation set, the rest of the training window and the test set (once).

        Called at the first optimiser step: until then the workers draw only the first
        shard and leave the cores to tracing the training step. A one-fill pool
        (`fill_steps`) queues a window of training shards before the validation set, so the
        first steps do not wait behind it, and the rest of the pool after it.
        """
        if not self.val_parts:
            if self.images.fill_steps:  # one pool: a window of it first, the rest after val
                self.images.start()
            self.val_parts = self.images.held_out(0, self.n_val, keep_images=True)
            self.images.start()
            self.images.fill()
            end = self.n_val + self.n_test
            self.test_parts = self.images.held_out(self.n_val, end, keep_images=True)

    def validation(self) -> Validation:
        """The validation set (waits for it the first time: the first epoch's end needs it)."""
        self.queue_rest()
        if self._val is None:
            self._val = join([f.result() for f in self.val_parts])
        labels = self._val.labels
        y = encode_labels(labels, self.alphabet, self.max_length)
        return Validation(self._val.x, y, labels, self.alphabet)

    def held_out(self, seed: int) -> LabelledImages:
        """Validation then test images (waits for both), named as `generate` names them.

        Called once training is over: the training batches end and training shards not yet
        drawn are dropped first, so a run that ends before its pool is in does not wait for
        the rest of the pool.
        """
        self.images.end_training()
        self.validation()
        assert self._val is not None
        both = join([self._val, *(f.result() for f in self.test_parts)])
        return LabelledImages(
            images=both.images,
            labels=both.labels,
            names=[f"synthetic-{seed}-{i:07d}" for i in range(self.n_val + self.n_test)],
            source=f"synthetic-stream:seed={seed}:held-out={self.n_val}+{self.n_test}",
        )


def sizes(config: TrainConfig) -> tuple[int, int, int]:
    """(validation, test, training pool) image counts of a synthetic config."""
    n_val = max(1, round(config.synthetic * config.val_fraction))
    n_test = max(1, round(config.synthetic * config.test_fraction))
    pool = config.synthetic - n_val - n_test
    if config.synthetic < 10 or pool < config.batch_size:
        raise DataError(
            "--synthetic needs at least 10 images and one batch beyond the held-out sets; "
            "try --synthetic 20000"
        )
    return n_val, n_test, pool


@contextmanager
def fresh_data(config: TrainConfig, arch: Architecture, alphabet: str) -> Iterator[FreshData]:
    """Start the generator workers on the first training shard (`queue_rest` adds the others)."""
    n_val, n_test, pool = sizes(config)
    spec = Spec(config.seed, alphabet, config.length, arch.height, arch.width)
    images = FreshImages(
        spec,
        batch=config.batch_size,
        first=n_val + n_test,
        capacity=pool,
        reuse=config.reuse,
        workers=config.workers,
        fill_steps=config.fill_steps,
        niceness=config.draw_niceness,
    )
    with images:
        images.start(1)
        yield FreshData(images, alphabet, config.length[1], n_val, n_test, pool)
