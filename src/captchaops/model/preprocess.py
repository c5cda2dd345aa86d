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


def to_pixels(image: Image.Image, height: int, width: int, channels: int = 1) -> np.ndarray:
    """A decoded PIL image as uint8[height, width, channels], grey (1) or RGB (3), transparency
    on white: the resized pixels before scaling (a quarter of the floats' bytes to send)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    mode = {1: "L", 3: "RGB"}[channels]
    array = np.asarray(image.convert(mode).resize((width, height), Image.Resampling.BILINEAR))
    return array[:, :, None] if channels == 1 else array


def unit_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels (any shape) as float32 in [0, 1]."""
    array = pixels.astype(np.float32)
    array /= 255.0  # in place: the same values as a division into a new array, one copy less
    return array


def to_array(image: Image.Image, height: int, width: int, channels: int = 1) -> np.ndarray:
    """A decoded PIL image as float32[height, width, channels] in [0, 1], grey (1) or RGB (3),
    transparency on white."""
    return unit_range(to_pixels(image, height, width, channels))


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
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
"""Start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic)."""
_JPEG_TABLES = frozenset({0xC4, 0xCC, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)})
"""Segments a decoder reads beside the frame: Huffman, arithmetic and quantisation tables,
restart interval, comment, application data (APP0-APP15)."""


def _refused(fmt: str, why: str) -> InvalidImage:
    return InvalidImage(f"the {fmt} image cannot be decoded ({why}); send an intact file")


def _check_jpeg(data: bytes) -> None:
    """Walk the JPEG's marker segments to its end (EOI) without decoding: count segments and
    scans, and refuse any byte, marker or length the walk does not understand."""
    pos, scans, segments, frames = 2, 0, 0, 0
    while True:
        if pos >= len(data):
            raise _refused("JPEG", "it ends before its end-of-image marker")
        if data[pos] != 0xFF:
            raise _refused("JPEG", f"byte {data[pos]:#04x} at offset {pos} where a marker belongs")
        marker = data[pos + 1] if pos + 1 < len(data) else 0xFF
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:  # end of image: nothing may follow it
            if pos + 2 != len(data):
                raise _refused("JPEG", f"{len(data) - pos - 2:,} bytes follow its end marker")
            return
        if marker not in _JPEG_FRAMES and marker not in _JPEG_TABLES and marker != 0xDA:
            raise _refused("JPEG", f"marker {marker:#04x} at offset {pos} is not one it reads")
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise TooCostly(
                f"the JPEG holds more than {MAX_JPEG_SEGMENTS} marker segments; "
                "re-encode it as a plain JPEG or PNG"
            )
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2 or pos + 2 + length > len(data):
            raise _refused("JPEG", f"the segment at offset {pos} runs past the end of the file")
        pos += 2 + length
        if marker in _JPEG_FRAMES:
            frames += 1
            if frames > 1:
                raise _refused("JPEG", "it holds more than one frame")
        elif marker == 0xDA:
            if not frames:
                raise _refused("JPEG", "a scan comes before the frame header")
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise TooCostly(
                    f"the JPEG holds more than {MAX_JPEG_SCANS} scans; "
                    "re-encode it as a baseline JPEG or PNG"
                )
            found = _JPEG_NEXT_MARKER.search(data, pos)
            if found is None:
                raise _refused("JPEG", "its last scan runs past the end of the file")
            pos = found.start()


_PNG_CRITICAL = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND"})
_PNG_TEXT = frozenset({b"tEXt", b"zTXt", b"iTXt"})


def _check_png(data: bytes) -> None:
    """Walk the PNG's chunks to IEND without inflating any: count chunks and text chunks, and
    refuse a chunk the walk cannot read, an unknown critical chunk or bytes after IEND."""
    pos, chunks, texts = 8, 0, 0
    while True:
        if pos + 12 > len(data):
            raise _refused("PNG", "it ends before its IEND chunk")
        length, kind = struct.unpack_from(">I4s", data, pos)
        if not kind.isalpha() or not kind.isascii():
            raise _refused("PNG", f"the chunk at offset {pos} has no valid type")
        if chunks == 0 and kind != b"IHDR":
            raise _refused("PNG", "its first chunk is not IHDR")
        if kind[:1].isupper() and kind not in _PNG_CRITICAL:
            raise _refused("PNG", f"it holds the unknown critical chunk {kind.decode()}")
        if pos + 12 + length > len(data):
            raise _refused("PNG", f"the {kind.decode()} chunk runs past the end of the file")
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise TooCostly(
                f"the PNG holds more than {MAX_PNG_CHUNKS:,} chunks; re-save it with a common encoder"
            )
        if kind in _PNG_TEXT:
            texts += 1
            if texts > MAX_PNG_TEXT_CHUNKS:
                raise TooCostly(
                    f"the PNG holds more than {MAX_PNG_TEXT_CHUNKS} text chunks; "
                    "strip its metadata and send it again"
                )
        pos += 12 + length
        if kind == b"IEND":
            if pos != len(data):
                raise _refused("PNG", f"{len(data) - pos:,} bytes follow its IEND chunk")
            return


_GIF_EXTENSIONS = frozenset({0x01, 0xF9, 0xFE, 0xFF})
"""Plain text, graphic control, comment and application extensions."""


def _gif_table(flags: int) -> int:
    """The bytes of the colour table a GIF's flags byte announces (0 without one)."""
    return 3 << ((flags & 7) + 1) if flags & 0x80 else 0


def _check_gif(data: bytes) -> None:
    """Walk the GIF's blocks to its trailer: count frames and blocks, and refuse any block the
    walk does not know (Pillow skips unknown bytes one by one) or bytes after the trailer."""
    if len(data) < 13:
        raise _refused("GIF", "it ends inside its header")
    pos = 13 + _gif_table(data[10])
    frames = blocks = 0
    while True:
        if pos >= len(data):
            raise _refused("GIF", "it ends before its trailer")
        kind = data[pos]
        if kind == 0x3B:  # trailer: nothing may follow it
            if pos + 1 != len(data):
                raise _refused("GIF", f"{len(data) - pos - 1:,} bytes follow its trailer")
            return
        blocks += 1
        if kind == 0x21:  # extension: label, then sub-blocks
            if pos + 1 >= len(data) or data[pos + 1] not in _GIF_EXTENSIONS:
                raise _refused("GIF", f"the extension at offset {pos} is not one it reads")
            pos += 2
        elif kind == 0x2C:  # image: descriptor, local table, LZW code size, then sub-blocks
            frames += 1
            if frames > MAX_GIF_FRAMES:
                raise TooCostly(
                    f"the GIF holds more than {MAX_GIF_FRAMES} frames; send a single image"
                )
            if pos + 10 >= len(data):
                raise _refused("GIF", "it ends inside an image descriptor")
            pos += 10 + _gif_table(data[pos + 9]) + 1
        else:
            raise _refused("GIF", f"byte {kind:#04x} at offset {pos} where a block belongs")
        while True:
            if pos >= len(data):
                raise _refused("GIF", "a block runs past the end of the file")
            if not data[pos]:
                break
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                raise TooCostly(
                    f"the GIF holds more than {MAX_GIF_BLOCKS:,} blocks; re-save it as one plain frame"
                )
            pos += 1 + data[pos]
        pos += 1


_BMP_HEADERS = frozenset({12, 40, 52, 56, 64, 108, 124})
"""DIB header sizes: OS/2 core, Windows 3 info, its bit-field variants, OS/2 2, v4 and v5."""
_BMP_COMPRESSIONS = frozenset({0, 1, 2, 3, 6})
"""Uncompressed, RLE8, RLE4, bit fields and alpha bit fields (JPEG or PNG inside a BMP: no)."""


def _check_bmp(data: bytes) -> None:
    """Refuse a BMP whose header the walk does not know, and large run-length-encoded ones
    (Pillow decodes those in Python)."""
    if len(data) < 26:
        raise _refused("BMP", "it ends inside its header")
    offset, header = struct.unpack_from("<II", data, 10)
    if header not in _BMP_HEADERS or len(data) < 14 + header:
        raise _refused("BMP", f"its {header}-byte header is not one it reads")
    if not 14 + header <= offset <= len(data):
        raise _refused("BMP", "its pixels start outside the file")
    if header == 12:
        return  # an OS/2 core header: no compression field
    compression = struct.unpack_from("<I", data, 30)[0]
    if compression not in _BMP_COMPRESSIONS:
        raise _refused("BMP", f"compression {compression} is not one it reads")
    if compression in (1, 2) and len(data) > MAX_RLE_BMP_BYTES:
        raise TooCostly(
            f"the run-length-encoded BMP is larger than {MAX_RLE_BMP_BYTES // 1024} KiB; "
            "send it as PNG"
        )


_COST_CHECKS = {"JPEG": _check_jpeg, "PNG": _check_png, "GIF": _check_gif, "BMP": _check_bmp}


def check_cost(data: bytes) -> str:
    """The sniffed format, after walking its structure to its end without decoding: what is too
    expensive to decode, and what the walk does not understand, is refused (it fails closed)."""
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
