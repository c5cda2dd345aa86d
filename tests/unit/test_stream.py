"""The fresh training stream: reproducible per seed, disjoint from the held-out sets, bounded."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from captchaops.data.stream import FreshImages, Spec, draw_shard, join
from captchaops.model.preprocess import preprocess

SPEC = Spec(seed=3, alphabet="0123456789ABC", length=(4, 4), height=24, width=72)
FIRST = 64  # samples [0, 64) are the held-out sets


def stream(workers: int, seed: int = 3, **kw: object) -> FreshImages:
    spec = Spec(seed, SPEC.alphabet, SPEC.length, SPEC.height, SPEC.width)
    options: dict[str, object] = {"capacity": 64, "reuse": 2.0, "shard": 16} | kw
    return FreshImages(spec, batch=8, first=FIRST, workers=workers, **options)  # type: ignore[arg-type]


def first_batches(images: FreshImages, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    with images:
        images.start()
        return list(itertools.islice(images.batches(), n))


def digests(x: np.ndarray) -> set[str]:
    return {hashlib.sha256(row.tobytes()).hexdigest() for row in x}


@pytest.fixture(scope="module")
def two_workers() -> list[tuple[np.ndarray, np.ndarray]]:
    """The first 20 batches (16 shards of 16 fresh images) drawn by two worker processes."""
    return first_batches(stream(workers=2), 20)


def test_same_seed_same_batches_with_any_worker_count(
    two_workers: list[tuple[np.ndarray, np.ndarray]],
) -> None:
    again = first_batches(stream(workers=1), 20)
    for (x1, y1), (x2, y2) in zip(two_workers, again, strict=True):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    other = first_batches(stream(workers=1, seed=4), 2)
    assert not np.array_equal(other[0][0], two_workers[0][0])


def test_training_images_never_include_the_held_out_samples(
    two_workers: list[tuple[np.ndarray, np.ndarray]],
) -> None:
    held_out = draw_shard(SPEC, 0, FIRST, keep_images=True)
    trained = np.concatenate([x for x, _ in two_workers])
    assert len(digests(trained)) > 3 * 16  # fresh shards keep arriving, not one shard reused
    assert digests(trained).isdisjoint(digests(held_out.x))
    # and the stream's arrays (made from the drawn image, not by decoding its PNG again) are
    # exactly what the one image pipeline makes of the PNG bytes the readers get
    for x, png in zip(held_out.x, held_out.images, strict=True):
        assert np.array_equal(x, preprocess(png, SPEC.height, SPEC.width))


def test_the_pool_and_the_shards_in_flight_stay_bounded() -> None:
    images = stream(workers=1, capacity=40, reuse=1.0, window=3)
    assert images.capacity == 48  # rounded up to whole shards
    with images:
        images.start()
        batches = images.batches()
        for _ in range(40):  # 40 steps x 8 fresh images: 20 shards through a pool of 3
            next(batches)
            assert len(images._pending) == 3
        assert images.generated == 20 * 16  # step t needs 1 + t * 8 // 16 shards
        assert images.x.shape[0] == 48


def test_held_out_sets_must_lie_below_the_stream() -> None:
    with stream(workers=1) as images:
        with pytest.raises(ValueError, match="below the training stream"):
            images.held_out(0, FIRST + 1)
        parts = images.held_out(0, FIRST, keep_images=True)
        shard = join([f.result() for f in parts])
    assert len(shard.labels) == len(shard.images) == FIRST


def test_held_out_sets_wait_for_the_first_step_and_are_numbered_below_the_stream() -> None:
    from captchaops.training.fresh import fresh_data
    from harness.training import tiny_config

    config = tiny_config()  # 300: 30 validation, 30 test, a pool of 240
    with fresh_data(config, config.arch, SPEC.alphabet) as fresh:
        assert len(fresh.images._pending) == 1 and not fresh.val_parts  # one shard only
        first = next(fresh.stream(8).batches)
        val = fresh.validation()  # what the first step (or the first validation) queues
        assert len(fresh.images._pending) == fresh.images.window
        data = fresh.held_out(config.seed)
    assert len(val.labels) == 30 and val.x.shape == (30, 24, 72, 1)
    assert data.names[0] == "synthetic-0-0000000" and data.names[-1] == "synthetic-0-0000059"
    assert data.labels[:30] == val.labels and len(data.images) == 60
    assert digests(first[0]).isdisjoint(digests(val.x))


def test_a_one_fill_pool_is_in_by_fill_steps_and_then_nothing_more_is_drawn() -> None:
    """`fill_steps`: the fixed set's images without the wait, the same batches on any workers."""
    runs = []
    for workers in (1, 2):
        images = stream(workers=workers, capacity=64, fill_steps=8)
        with images:
            images.start(1)
            batches = images.batches()
            taken = [next(batches)]
            images.fill()  # what the first step queues: the rest of the pool
            assert images._submitted == 4 and images.total == 4  # 64 images, shards of 16
            taken += [next(batches) for _ in range(7)]
            assert images.generated == 64  # step 7 needed 1 + 7 * 4 // 8 = 4 shards: all in
            taken += [next(batches) for _ in range(40)]
            assert images.generated == 64 and not images._pending  # no shard after the pool
        runs.append(taken)
    for (x1, y1), (x2, y2) in zip(*runs, strict=True):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    trained = np.concatenate([x for x, _ in runs[0][8:]])
    assert len(digests(trained)) > 40  # later batches sample the whole pool, not its first shard
    with pytest.raises(ValueError, match="fill_steps"):
        stream(workers=1, fill_steps=0)


def test_a_one_fill_pool_queues_all_of_itself_at_the_first_step_around_the_validation_set() -> None:
    from dataclasses import replace

    from captchaops.training.fresh import fresh_data
    from harness.training import tiny_config

    config = replace(tiny_config(), fill_steps=100)  # a pool of 240: one shard of 256
    with fresh_data(config, config.arch, SPEC.alphabet) as fresh:
        training = fresh.stream(8)
        assert training.steady_from == 100  # the step plan is timed once the pool is in
        first = next(training.batches)
        val = fresh.validation()
        assert fresh.images.total == 1 and fresh.images._submitted == 1  # nothing beyond it
        data = fresh.held_out(config.seed)
    assert len(val.labels) == 30 and len(data.images) == 60
    assert digests(first[0]).isdisjoint(digests(val.x))


def test_batches_go_through_the_pool_in_passes_without_replacement() -> None:
    """Each pass uses every pooled image once, as `fit` goes through shuffled arrays (drawn with
    replacement, some images go unused for many steps while others repeat)."""
    images = stream(workers=1, capacity=64, fill_steps=4)
    with images:
        images.start(1)
        images.fill()
        batches = images.batches()
        for _ in range(8):  # the pool is in by step 4; the passes before it are partial
            next(batches)
        taken = [next(batches) for _ in range(40)]  # 320 rows: five passes over 64 images
    uses: dict[str, int] = {}
    for x, _ in taken:
        for digest in (hashlib.sha256(row.tobytes()).hexdigest() for row in x):
            uses[digest] = uses.get(digest, 0) + 1
    assert len(uses) == 64  # every pooled image is used...
    assert min(uses.values()) >= 4 and max(uses.values()) <= 6  # ...about as often as any other


def test_the_drawing_workers_run_at_the_niceness_asked_for() -> None:
    import os

    with stream(workers=1, niceness=5) as images:
        worker = images._executor().submit(os.nice, 0).result()  # os.nice(0): the niceness now
    assert worker == min(os.nice(0) + 5, 19)


def test_a_run_that_ends_before_its_pool_is_in_does_not_wait_for_the_rest_of_it() -> None:
    """The test set is queued behind a one-fill pool; training that ends first (a slow machine,
    a short budget) drops the pool's undrawn shards instead of waiting for them to test."""
    from dataclasses import replace

    from captchaops.training.fresh import fresh_data
    from harness.training import tiny_config

    config = replace(  # 80 validation, 80 test, a pool of 15 shards
        tiny_config(), synthetic=4000, val_fraction=0.02, test_fraction=0.02, fill_steps=1000
    )
    with fresh_data(config, config.arch, SPEC.alphabet) as fresh:
        next(fresh.stream(8).batches)  # one step, then training ends
        fresh.validation()
        pool = list(fresh.images._pending)
        data = fresh.held_out(config.seed)
        assert len(pool) >= 10 and sum(f.cancelled() for f in pool) >= 5  # a worker, 2 queued
        assert not fresh.images._pending
    assert len(data.images) == 160 and data.names[-1] == "synthetic-0-0000159"


def test_the_batches_end_when_fit_returns_and_nothing_keeps_drawing() -> None:
    """Training pulls every batch on its own thread (no `tf.data` prefetch thread, whose
    iterator's destructor blocked a garbage collection after `fit`); when it returns, the
    generator is closed and nothing asks for shards any more; leaving the block joins the
    workers."""
    import inspect
    import multiprocessing
    import threading
    import time

    import keras

    from captchaops.training.loop import Stream, fit_stream

    # each step needs a fresh shard, so a prefetch thread would be waiting for one at the end
    images = stream(workers=1, capacity=64, reuse=0.5)
    model = keras.Sequential(
        [keras.Input((24, 72, 1)), keras.layers.Flatten(), keras.layers.Dense(4)]
    )
    model.compile(optimizer="sgd", loss="mse")
    pulled_on: set[threading.Thread] = set()

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for batch in images.batches():
            pulled_on.add(threading.current_thread())
            yield batch

    with images:
        images.start()
        training = batches()
        fit_stream(
            model, Stream(training, 3, lambda: images.generated, end=images.end_training), 2, []
        )
        assert pulled_on == {threading.current_thread()}
        assert inspect.getgeneratorstate(training) == inspect.GEN_CLOSED
        assert images._idle.is_set() and not images._pending
        assert int(model.optimizer.iterations.numpy()) == 6
        admitted = images.admitted
        time.sleep(0.5)
        assert images.admitted == admitted  # nothing pulls batches after training
        with pytest.raises(StopIteration):
            next(images.batches())
    assert not multiprocessing.active_children()


def test_a_stream_is_fitted_as_model_fit_fits_it() -> None:
    """The stream's step loop gives the callbacks what `model.fit` gives them (hooks, order,
    batch indices, per-step and epoch-mean losses, `stop_training`, History) and ends with the
    same weights, the optimiser's averaged ones swapped in."""
    import keras

    from captchaops.training.loop import Stream, fit_stream

    class Events(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[object, ...]] = []

        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            self.seen.append(("train_begin", self.params["epochs"], self.params["steps"]))

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.seen.append(("epoch_begin", epoch))

        def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            self.seen.append(("batch_begin", batch))

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            self.seen.append(("batch_end", batch, round(float((logs or {})["loss"]), 4)))

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.seen.append(("epoch_end", epoch, round(float((logs or {})["loss"]), 4)))
            if epoch == 1:
                self.model.stop_training = True  # of 3 epochs asked for, 2 run

        def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
            self.seen.append(("train_end", round(float((logs or {})["loss"]), 4)))

    def data() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng(5)
        while True:
            yield rng.random((8, 6), dtype=np.float32), rng.random((8, 2), dtype=np.float32)

    keras.utils.set_random_seed(1)
    first = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])
    second = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])
    second.set_weights(first.get_weights())
    runs = []
    for model in (first, second):
        model.compile(
            optimizer=keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.5), loss="mse"
        )
        runs.append(Events())
    first.fit(data(), steps_per_epoch=4, epochs=3, callbacks=[runs[0]], shuffle=False, verbose=0)
    fit_stream(second, Stream(data(), 4, lambda: 0), 3, [runs[1]])
    assert runs[1].seen == runs[0].seen
    assert len(runs[1].seen) == 1 + 2 * (2 + 2 * 4) + 1
    for ours, theirs in zip(second.get_weights(), first.get_weights(), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert second.history.history["loss"] == pytest.approx(first.history.history["loss"], abs=1e-5)
    assert int(second.optimizer.iterations.numpy()) == 8


def test_a_run_that_ends_before_its_first_step_draws_only_the_held_out_sets() -> None:
    """A budget spent before the first step (a slow machine): the held-out sets are queued
    after training has ended, and no training shard is queued with them."""
    from captchaops.training.fresh import fresh_data
    from harness.training import tiny_config

    config = tiny_config()
    with fresh_data(config, config.arch, SPEC.alphabet) as fresh:
        data = fresh.held_out(config.seed)  # no step: queue_rest runs after the end
        assert fresh.images._submitted == 1 and not fresh.images._pending  # the first shard only
    assert len(data.images) == 60


def test_a_stream_runs_several_steps_a_call_and_reports_the_last_one() -> None:
    """With `steps_per_execution`, one call runs several steps and the callbacks hear of the
    last one run (a short last call of an epoch reports its true last step)."""
    import keras

    from captchaops.training.loop import Stream, fit_stream

    ends: list[int] = []
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=3)
    batches = itertools.repeat((np.ones((4, 6), np.float32), np.zeros((4, 2), np.float32)))
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: ends.append(batch)
    )
    fit_stream(model, Stream(batches, 4, lambda: 0), 2, [record])
    assert ends == [2, 3, 2, 3]
    assert int(model.optimizer.iterations.numpy()) == 8
