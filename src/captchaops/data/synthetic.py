"""Reproducible synthetic CAPTCHAs from the `captcha` package (same seed -> identical PNG bytes)."""

from __future__ import annotations

import io
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import get_context

import captcha.image
import numpy as np
from captcha.image import ImageCaptcha

from captchaops.model.preprocess import to_array

DIGITS_UPPER = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LOCK = threading.Lock()
_CHUNK = 500


@dataclass(frozen=True)
class Sample:
    """One labelled CAPTCHA: PNG bytes, the text drawn in it, optionally the network input."""

    image: bytes
    label: str
    array: np.ndarray | None = field(default=None, compare=False, repr=False)


class _SeededSecrets:
    """Stands in for the `secrets` module inside `captcha.image`, drawing from a seeded RNG."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def randbelow(self, n: int) -> int:
        return self._rng.randrange(n)

    def randbits(self, k: int) -> int:
        return self._rng.getrandbits(k)

    def choice(self, seq):  # type: ignore[no-untyped-def]
        return self._rng.choice(seq)


@contextmanager
def _seeded(rng: random.Random) -> Iterator[None]:
    """Route `captcha.image`'s randomness through `rng` for the duration of the block."""
    with _LOCK:
        original = captcha.image.secrets
        captcha.image.secrets = _SeededSecrets(rng)  # type: ignore[assignment]
        try:
            yield
        finally:
            captcha.image.secrets = original


def _draw(
    rng: random.Random,
    generator: ImageCaptcha,
    alphabet: str,
    length: tuple[int, int],
    preprocess_to: tuple[int, int] | None = None,
) -> Sample:
    label = "".join(rng.choice(alphabet) for _ in range(rng.randint(length[0], length[1])))
    with _seeded(rng):
        image = generator.generate_image(label)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    # The network input from the drawn image itself: PNG is lossless, so this is what
    # `preprocess` makes of the bytes, without decoding (and checking) our own PNG again.
    array = to_array(image, *preprocess_to) if preprocess_to is not None else None
    return Sample(image=buffer.getvalue(), label=label, array=array)


def generate_one(
    rng_seed: int | None = None,
    *,
    alphabet: str = DIGITS_UPPER,
    length: tuple[int, int] = (4, 4),
    width: int = 160,
    height: int = 60,
) -> Sample:
    """One CAPTCHA; reproducible when `rng_seed` is given, fresh randomness otherwise."""
    rng = random.Random(rng_seed)
    return _draw(rng, ImageCaptcha(width=width, height=height), alphabet, length)


def generate_range(
    start: int,
    stop: int,
    seed: int,
    alphabet: str,
    length: tuple[int, int],
    width: int = 160,
    height: int = 60,
    preprocess_to: tuple[int, int] | None = None,
) -> list[Sample]:
    """Samples [start, stop) of `seed`: sample i depends only on (seed, i)."""
    generator = ImageCaptcha(width=width, height=height)
    return [
        _draw(random.Random(f"{seed}/{i}"), generator, alphabet, length, preprocess_to)
        for i in range(start, stop)
    ]


def _draw_chunk(start: int, stop: int, args: tuple, timeout: float | None) -> list[Sample]:
    return generate_range(start, stop, *args)  # in this process: no wait to bound


def _within(
    deadline: float | None, chunks: list[Callable[[float | None], list[Sample]]]
) -> list[Sample]:
    """The chunks in order until `deadline` (at least the first): each is asked with the time
    left, and one not ready in time (`TimeoutError`) ends the draw."""
    drawn: list[Sample] = []
    for chunk in chunks:
        left = None if deadline is None or not drawn else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        try:
            drawn += chunk(left)
        except FuturesTimeout:
            break
    return drawn


def generate(
    n: int,
    seed: int,
    *,
    alphabet: str = DIGITS_UPPER,
    length: tuple[int, int] = (4, 4),
    width: int = 160,
    height: int = 60,
    workers: int = 1,
    preprocess_to: tuple[int, int] | None = None,
    deadline: float | None = None,
) -> list[Sample]:
    """`n` CAPTCHAs; sample i depends only on (seed, i), so any worker count gives the same set.

    With `preprocess_to=(height, width)` each sample also carries its network input array.
    With `deadline` (a `time.monotonic()` value) it returns the samples [0, k) drawn by then,
    in whole chunks of 500 and at least one chunk, so a slow machine gets fewer of the same
    images instead of a draw that eats the training budget.
    """
    if not alphabet or length[0] < 1 or length[1] < length[0]:
        raise ValueError("need a non-empty alphabet and 1 <= min length <= max length")
    args = (seed, alphabet, length, width, height, preprocess_to)
    chunks = [(a, min(a + _CHUNK, n)) for a in range(0, n, _CHUNK)]
    if workers <= 1 or n <= _CHUNK:
        return _within(deadline, [partial(_draw_chunk, a, b, args) for a, b in chunks])
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
    try:
        futures = [pool.submit(generate_range, a, b, *args) for a, b in chunks]
        return _within(deadline, [f.result for f in futures])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
