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
from dataclasses import dataclass

from captchaops.data.dataset import DataError, LabelledImages
from captchaops.data.stream import FreshImages, Shard, Spec, join
from captchaops.model.crnn import Architecture
from captchaops.model.ctc import encode_labels
from captchaops.training.config import TrainConfig
from captchaops.training.loop import Stream, Validation


@dataclass
class FreshData:
    """The fixed held-out sets and the stream of fresh training batches."""

    images: FreshImages
    val: Validation
    val_shard: Shard
    test: list[Future[Shard]]
    n_val: int
    n_test: int
    capacity: int  # training images in the pool, as asked (the stream rounds up to whole shards)

    def stream(self, steps_per_epoch: int) -> Stream:
        """The training batches for `fit`, `steps_per_epoch` steps between validations."""
        return Stream(self.images.batches(), steps_per_epoch, lambda: self.images.generated)

    def held_out(self, seed: int) -> LabelledImages:
        """Validation then test images (waits for the test set), named as `generate` names them."""
        both = join([self.val_shard, *(f.result() for f in self.test)])
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
    """Start the generator workers: validation set first, then training shards and the test set."""
    n_val, n_test, pool = sizes(config)
    spec = Spec(config.seed, alphabet, config.length, arch.height, arch.width)
    images = FreshImages(
        spec,
        batch=config.batch_size,
        first=n_val + n_test,
        capacity=pool,
        reuse=config.reuse,
        workers=config.workers,
    )
    with images:
        val_futures = images.held_out(0, n_val, keep_images=True)
        images.start()
        test = images.held_out(n_val, n_val + n_test, keep_images=True)
        shard = join([f.result() for f in val_futures])
        val = Validation(
            shard.x, encode_labels(shard.labels, alphabet, config.length[1]), shard.labels, alphabet
        )
        yield FreshData(images, val, shard, test, n_val, n_test, pool)
