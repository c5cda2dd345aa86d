"""Reproducible synthetic CAPTCHAs from the `captcha` package (same seed -> identical PNG bytes)."""

from __future__ import annotations

import io
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
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
    starts = range(0, n, _CHUNK)
    if workers <= 1 or n <= _CHUNK:
        drawn: list[Sample] = []
        for s in starts:
            if drawn and deadline is not None and time.monotonic() >= deadline:
                break
            drawn += generate_range(s, min(s + _CHUNK, n), *args)
        return drawn
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
    try:
        futures = [pool.submit(generate_range, s, min(s + _CHUNK, n), *args) for s in starts]
        drawn = []
        for future in futures:
            left = None if deadline is None or not drawn else deadline - time.monotonic()
            try:
                drawn += future.result(timeout=None if left is None else max(left, 0.0))
            except FuturesTimeout:
                break
        return drawn
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
