"""THE image pipeline: image bytes -> the network's input tensor, for training, evaluation and serving.

Decoding and resizing give float32[H, W, C] in [0, 1] (C = 1 grey, as our CRNN trains on, or
3 RGB); `network_input` then scales a batch and lays it out as a version's contract asks
(meta.json: NHWC or NCHW, 0..1, -1..1 or mean/std). Shipped inside every registered version
as `captcha_runtime.preprocess`: standard library, numpy and Pillow only, no captchaops imports.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import warnings

import numpy as np
from PIL import Image

MAX_PIXELS = 1_000_000
"""Images whose header declares more pixels than this are refused before decoding (CAPTCHAs
are a few thousand; a 4000x4000 PNG bomb would need 64 MB to decode)."""

MAX_JPEG_SCANS = 32
"""Scans a JPEG may hold: a baseline file has 1 to 3, Pillow's and libjpeg's progressive ones 6
to 10. Each scan costs a pass over every block, so 83,000 tiny repeated scans in a 1 MB
1000x1000 file take tens of seconds to decode; they are counted from the markers and refused."""
MAX_JPEG_SEGMENTS = 512
"""Marker segments (tables, scans, metadata) a JPEG may hold."""
MAX_PNG_CHUNKS = 1_024
"""Chunks a PNG may hold: encoders split pixel data into 8-64 KiB IDAT chunks, so a 1 MiB file
needs about 130; Pillow parses each chunk in Python (80,000 empty ones take seconds)."""
MAX_PNG_TEXT_CHUNKS = 16
"""Text chunks (tEXt, zTXt, iTXt) a PNG may hold: each zTXt can inflate to 1 MB in Pillow."""
MAX_GIF_FRAMES = 256
MAX_GIF_BLOCKS = 16_384
"""Frames, and extension blocks plus data sub-blocks, a GIF may hold (Pillow reads extensions in
Python: 200,000 tiny comments take a second)."""
MAX_RLE_BMP_BYTES = 64 * 1024
"""RLE-compressed BMPs are decoded by Pillow in Python (2 s for 1000x1000); larger ones are
refused."""

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
MIME_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "BMP": "image/bmp"}
"""The media type of each format `sniff_format` names."""
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "BMP": "bmp"}
"""The file suffix each format is stored under."""


class InvalidImage(ValueError):
    """Bytes that are not a usable PNG, JPEG, GIF or BMP image (the message says why)."""


class BadBase64(InvalidImage):
    """An image value that is not base64 text."""


class ImageTooLarge(InvalidImage):
    """An image whose encoded bytes exceed the size limit."""


class TooManyPixels(InvalidImage):
    """An image whose header declares more pixels than the limit (refused without decoding)."""


class TooCostly(InvalidImage):
    """An image whose structure would make decoding expensive (too many scans, chunks or frames)."""


def b64decode_image(value: object, index: int, max_bytes: int | None = None) -> bytes:
    """One base64 image value (str or bytes; line breaks allowed) as bytes, at most `max_bytes`."""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if not isinstance(value, str):
        raise BadBase64(
            f"image {index} is a {type(value).__name__}, not text; send base64-encoded image bytes"
        )
    if max_bytes is None or len(value) // 4 * 3 <= max_bytes + 2:
        # Most values hold no line breaks: strict base64 of the value itself is then the same
        # bytes as below, without splitting and re-joining a copy of it first.
        try:
            data = binascii.a2b_base64(value, strict_mode=True)
        except (binascii.Error, ValueError):
            pass
        else:
            if max_bytes is not None and len(data) > max_bytes:
                raise _too_large(index, max_bytes)
            return data
    text = "".join(value.split())
    if max_bytes is not None and len(text) // 4 * 3 > max_bytes + 2:
        raise _too_large(index, max_bytes)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadBase64(
            f"image {index} is not valid base64 ({exc}); base64-encode the image bytes"
        ) from exc
    if max_bytes is not None and len(data) > max_bytes:
        raise _too_large(index, max_bytes)
    return data


def _too_large(index: int, max_bytes: int) -> ImageTooLarge:
    return ImageTooLarge(f"image {index} is larger than {max_bytes:,} bytes; send a smaller image")


def sniff_format(data: bytes) -> str:
    """The image format of `data` judged by its content: 'PNG', 'JPEG', 'GIF' or 'BMP'."""
    if not data:
        raise InvalidImage("the image is empty; send PNG, JPEG, GIF or BMP bytes")
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    raise InvalidImage("not a PNG, JPEG, GIF or BMP image; send one of those formats")


def to_array(image: Image.Image, height: int, width: int, channels: int = 1) -> np.ndarray:
    """A decoded PIL image as float32[height, width, channels] in [0, 1], grey (1) or RGB (3),
    transparency on white."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    mode = {1: "L", 3: "RGB"}[channels]
    pixels = image.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(pixels, dtype=np.float32)
    array /= 255.0  # in place: the same values as a division into a new array, one copy less
    return array[:, :, None] if channels == 1 else array


def network_input(
    batch: np.ndarray,
    layout: str = "NHWC",
    scaling: str = "0..1",
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> np.ndarray:
    """A batch float32[N, H, W, C] in [0, 1] scaled (`0..1`, `-1..1` or `mean_std`: (x - mean)
    / std per channel) and laid out (`NHWC` or `NCHW`) as a version's contract asks."""
    if scaling == "-1..1":
        batch = batch * np.float32(2.0) - np.float32(1.0)
    elif scaling == "mean_std":
        if mean is None or std is None:
            raise ValueError("mean_std scaling needs a mean and a std per channel")
        batch = (batch - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    elif scaling != "0..1":
        raise ValueError(f"unknown pixel scaling {scaling!r}; use 0..1, -1..1 or mean_std")
    if layout == "NCHW":
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
    if layout != "NHWC":
        raise ValueError(f"unknown input layout {layout!r}; use NHWC or NCHW")
    return batch


_JPEG_NEXT_MARKER = re.compile(rb"\xff(?=[^\x00\xd0-\xd7])")
"""A marker after entropy-coded data: 0xFF not followed by a stuffed zero or a restart code."""


def _check_jpeg(data: bytes) -> None:
    """Count the JPEG's marker segments and scans without decoding any (refuse too many)."""
    pos, scans, segments = 2, 0, 0
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:  # end of image
            return
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise TooCostly(
                f"the JPEG holds more than {MAX_JPEG_SEGMENTS} marker segments; "
                "re-encode it as a plain JPEG or PNG"
            )
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise TooCostly(
                    f"the JPEG holds more than {MAX_JPEG_SCANS} scans; "
                    "re-encode it as a baseline JPEG or PNG"
                )
            found = _JPEG_NEXT_MARKER.search(data, pos)
            if found is None:
                return
            pos = found.start()


def _check_png(data: bytes) -> None:
    """Count the PNG's chunks (and its text chunks) without inflating any (refuse too many)."""
    pos, chunks, texts = 8, 0, 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise TooCostly(
                f"the PNG holds more than {MAX_PNG_CHUNKS:,} chunks; re-save it with a common encoder"
            )
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            texts += 1
            if texts > MAX_PNG_TEXT_CHUNKS:
                raise TooCostly(
                    f"the PNG holds more than {MAX_PNG_TEXT_CHUNKS} text chunks; "
                    "strip its metadata and send it again"
                )
        if kind == b"IEND":
            return
        pos += 12 + length


def _check_gif(data: bytes) -> None:
    """Count the GIF's frames and blocks by walking its block structure (refuse too many)."""
    pos = 13 + (3 << ((data[10] & 7) + 1) if len(data) > 10 and data[10] & 0x80 else 0)
    frames = blocks = 0
    while pos < len(data):
        kind = data[pos]
        if kind == 0x3B:  # trailer
            return
        blocks += 1
        if kind == 0x21:  # extension: label, then sub-blocks
            pos += 2
        elif kind == 0x2C:  # image: descriptor, local table, LZW code size, then sub-blocks
            frames += 1
            if frames > MAX_GIF_FRAMES:
                raise TooCostly(
                    f"the GIF holds more than {MAX_GIF_FRAMES} frames; send a single image"
                )
            flags = data[pos + 9] if pos + 9 < len(data) else 0
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1
        else:
            return  # not a block Pillow reads either: it reports the damage
        while pos < len(data) and data[pos]:
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                raise TooCostly(
                    f"the GIF holds more than {MAX_GIF_BLOCKS:,} blocks; re-save it as one plain frame"
                )
            pos += 1 + data[pos]
        pos += 1


def _check_bmp(data: bytes) -> None:
    """Refuse large run-length-encoded BMPs (Pillow decodes those in Python)."""
    if len(data) < 34 or struct.unpack_from("<I", data, 14)[0] < 40:
        return  # an OS/2 core header: no compression field
    rle = struct.unpack_from("<I", data, 30)[0] in (1, 2)
    if rle and len(data) > MAX_RLE_BMP_BYTES:
        raise TooCostly(
            f"the run-length-encoded BMP is larger than {MAX_RLE_BMP_BYTES // 1024} KiB; "
            "send it as PNG"
        )


_COST_CHECKS = {"JPEG": _check_jpeg, "PNG": _check_png, "GIF": _check_gif, "BMP": _check_bmp}


def check_cost(data: bytes) -> str:
    """The sniffed format, after refusing structures that are expensive to decode (no decoding)."""
    fmt = sniff_format(data)
    _COST_CHECKS[fmt](data)
    return fmt


def _open(data: bytes, max_pixels: int, fmt: str | None = None) -> tuple[Image.Image, str]:
    """The image opened lazily: header parsed, no pixel decoded yet (`fmt`: already checked)."""
    fmt = fmt or check_cost(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=[fmt]), fmt
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(
            f"the image declares more than {max_pixels:,} pixels; send a smaller image"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImage(
            f"the {fmt} image cannot be decoded ({exc}); send an intact file"
        ) from exc


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise TooManyPixels(
            f"the image is {width}x{height} pixels, more than {max_pixels:,}; send a smaller image"
        )
    if width < 1 or height < 1:
        raise InvalidImage("the image has no pixels; send a real image")


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) read from the image header, without decoding the pixels."""
    with _open(data, MAX_PIXELS)[0] as image:
        return image.size


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, which the format puts first; None without one."""
    if len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack_from(">II", data, 16)
        return width, height
    return None


def check_size(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header, refusing images over `max_pixels` without decoding them.

    A PNG's size is read from its IHDR bytes (a model server checks every image of a request
    on its event loop; Pillow's open costs ten times more); the decode opens it with Pillow."""
    fmt = check_cost(data)  # once: a JPEG's scan walk is the costliest check on the event loop
    size = _png_size(data) if fmt == "PNG" else None
    if size is None:
        with _open(data, max_pixels, fmt)[0] as image:
            size = image.size
    _check_pixels(size, max_pixels)
    return size


def decode(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode image bytes into a loaded PIL image, refusing oversized (by header) or broken files."""
    image, fmt = _open(data, max_pixels)
    _check_pixels(image.size, max_pixels)
    try:
        image.seek(0)
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImage(
            f"the {fmt} image cannot be decoded ({exc}); send an intact file"
        ) from exc
    return image


def preprocess(
    data: bytes, height: int, width: int, max_pixels: int = MAX_PIXELS, channels: int = 1
) -> np.ndarray:
    """Image bytes as one network input: float32[height, width, channels] in [0, 1]."""
    return to_array(decode(data, max_pixels), height, width, channels)
