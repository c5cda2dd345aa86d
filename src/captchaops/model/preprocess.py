"""THE image pipeline: image bytes -> float32[H, W, 1] in [0, 1] for training, evaluation and serving."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

MAX_PIXELS = 16_000_000
"""Images whose header declares more pixels than this are refused before decoding."""

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)


class InvalidImage(ValueError):
    """Bytes that are not a usable PNG, JPEG, GIF or BMP image (the message says why)."""


def sniff_format(data: bytes) -> str:
    """The image format of `data` judged by its content: 'PNG', 'JPEG', 'GIF' or 'BMP'."""
    if not data:
        raise InvalidImage("the image is empty; send PNG, JPEG, GIF or BMP bytes")
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    raise InvalidImage("not a PNG, JPEG, GIF or BMP image; send one of those formats")


def to_array(image: Image.Image, height: int, width: int) -> np.ndarray:
    """A decoded PIL image as float32[height, width, 1] grayscale in [0, 1] (transparency on white)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    gray = image.convert("L").resize((width, height), Image.Resampling.BILINEAR)
    return (np.asarray(gray, dtype=np.float32) / 255.0)[:, :, None]


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) read from the image header, without decoding the pixels."""
    fmt = sniff_format(data)
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as image:
            return image.size
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImage(f"the {fmt} image header cannot be read ({exc})") from exc


def decode(data: bytes) -> Image.Image:
    """Decode image bytes into a loaded PIL image, refusing oversized or broken files."""
    fmt = sniff_format(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise InvalidImage(
                    f"the image is {width}x{height} pixels, more than {MAX_PIXELS:,}; send a smaller image"
                )
            if width < 1 or height < 1:
                raise InvalidImage("the image has no pixels; send a real image")
            image.seek(0)
            image.load()
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(
            f"the image declares more than {MAX_PIXELS:,} pixels; send a smaller image"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImage(
            f"the {fmt} image cannot be decoded ({exc}); send an intact file"
        ) from exc
    return image


def preprocess(data: bytes, height: int, width: int) -> np.ndarray:
    """Image bytes as the network input: float32[height, width, 1] in [0, 1]."""
    return to_array(decode(data), height, width)
