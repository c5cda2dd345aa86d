"""Preprocessing: every accepted format and mode becomes float32[H, W, 1]; bad bytes are refused."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from captchaops.model.preprocess import (
    MAX_PIXELS,
    InvalidImage,
    TooManyPixels,
    check_size,
    preprocess,
    sniff_format,
)


def encode(image: Image.Image, fmt: str, **options: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size in a valid IHDR chunk but carries almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        ("PNG", "RGBA"),
        ("PNG", "RGB"),
        ("PNG", "L"),
        ("PNG", "P"),
        ("JPEG", "RGB"),
        ("JPEG", "L"),
        ("GIF", "P"),
        ("BMP", "RGB"),
        ("PNG", "I;16"),
        ("PNG", "1"),
    ],
)
def test_any_format_and_mode_becomes_a_unit_range_array(fmt: str, mode: str) -> None:
    image = Image.new("RGB", (200, 50), (250, 250, 250))
    image.paste((20, 20, 20), (50, 10, 150, 40))
    data = encode(image.convert(mode), fmt)
    assert sniff_format(data) == fmt
    array = preprocess(data, 32, 96)
    assert array.shape == (32, 96, 1)
    assert array.dtype == np.float32
    assert 0.0 <= array.min() < 0.3 and 0.7 < array.max() <= 1.0


def test_transparent_background_reads_as_white() -> None:
    image = Image.new("RGBA", (60, 20), (0, 0, 0, 0))
    image.paste((0, 0, 0, 255), (20, 5, 40, 15))
    array = preprocess(encode(image, "PNG"), 20, 60)[:, :, 0]
    assert array[0, 0] == pytest.approx(1.0)
    assert array[10, 30] == pytest.approx(0.0)


def test_the_same_pixels_give_the_same_array_whatever_the_lossless_encoding() -> None:
    # Training and serving agreeing on the same bytes is tests/integration/test_parity.py.
    image = Image.effect_noise((160, 60), 64).convert("RGB")
    png = preprocess(encode(image, "PNG"), 32, 96)
    assert png.std() > 0.01
    for other in (
        encode(image, "BMP"),
        encode(image.convert("RGBA"), "PNG"),  # fully opaque: the white backdrop never shows
        encode(image, "PNG", compress_level=9),
    ):
        assert np.array_equal(preprocess(other, 32, 96), png)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (b"hello, not an image", "not a PNG"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 30, "cannot be decoded"),
        (b"GIF89a" + b"\xff" * 10, "cannot be decoded"),
    ],
)
def test_bad_bytes_raise_invalid_image(data: bytes, words: str) -> None:
    with pytest.raises(InvalidImage, match=words):
        preprocess(data, 32, 96)


def test_truncated_png_is_refused() -> None:
    data = encode(Image.effect_noise((160, 60), 64), "PNG")
    with pytest.raises(InvalidImage, match="cannot be decoded"):
        preprocess(data[: len(data) // 2], 32, 96)


def test_oversized_image_is_refused_before_decoding() -> None:
    data = png_header_only(20_000, 20_000)
    assert MAX_PIXELS < 20_000 * 20_000
    with pytest.raises(InvalidImage, match="smaller image"):
        preprocess(data, 32, 96)


def test_invalid_image_is_a_value_error_with_one_line() -> None:
    with pytest.raises(ValueError) as info:
        preprocess(b"nope", 32, 96)
    assert "\n" not in str(info.value)


def test_a_png_size_is_read_from_its_header_as_pillow_reads_it() -> None:
    for size, mode in (((160, 60), "RGB"), ((7, 300), "LA"), ((1, 1), "P")):
        buffer = io.BytesIO()
        Image.new(mode, size).save(buffer, format="PNG")
        assert check_size(buffer.getvalue()) == size
    huge = io.BytesIO()
    Image.new("L", (1, 1)).save(huge, format="PNG")
    declared = bytearray(huge.getvalue())
    declared[16:24] = struct.pack(">II", 5000, 5000)  # the header lies; refused before any read
    with pytest.raises(TooManyPixels):
        check_size(bytes(declared))
