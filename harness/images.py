"""Images that are cheap to send and expensive to decode: the attack suite's decoding bombs.

Each passes the pixel check (at most 1000x1000) and is under 1 MiB, yet takes Pillow seconds to
decode without the structure checks of `captchaops.model.preprocess`.
"""

from __future__ import annotations

import io
import struct
import zlib
from functools import cache

from PIL import Image


def jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """A JPEG split into (marker, bytes) segments, each scan with its entropy-coded data."""
    pos, out = 2, []
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:
            out.append((marker, data[pos : pos + 2]))
            break
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:
            while data[end] != 0xFF or data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end += 1
        out.append((marker, data[pos:end]))
        pos = end
    return out


@cache
def jpeg_bomb(side: int = 1000, scans: int = 60_000) -> bytes:
    """A progressive grayscale JPEG whose smallest AC scan (one end-of-band run over every block,
    12 bytes) is repeated `scans` times: each repeat makes the decoder visit every block again."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 255).save(buffer, format="JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    segments = jpeg_segments(data)
    ac_scans = [
        (i, seg)
        for i, (marker, seg) in enumerate(segments)
        if marker == 0xDA and seg[5 + 2 * seg[4]] > 0  # spectral start > 0: an AC scan
    ]
    at, scan = min(ac_scans, key=lambda found: len(found[1]))
    return (
        data[:2]
        + b"".join(seg for _, seg in segments[:at])
        + scan * scans
        + b"".join(seg for _, seg in segments[at:])
    )


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk with its length and CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@cache
def png_chunk_bomb(chunks: int = 60_000, kind: bytes = b"abCd") -> bytes:
    """A 100x30 gray PNG with `chunks` empty ancillary chunks before its pixels."""
    body = b"\0" * 101 * 30
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100, 30, 8, 0, 0, 0, 0))
        + png_chunk(kind, b"a\0b" if kind == b"tEXt" else b"") * chunks
        + png_chunk(b"IDAT", zlib.compress(body))
        + png_chunk(b"IEND", b"")
    )


@cache
def gif_comment_bomb(comments: int = 120_000) -> bytes:
    """A 100x30 GIF with `comments` two-byte comment extensions before its one frame."""
    buffer = io.BytesIO()
    Image.new("P", (100, 30)).save(buffer, format="GIF")
    gif = buffer.getvalue()
    header = 13 + (3 << ((gif[10] & 7) + 1) if gif[10] & 0x80 else 0)
    return gif[:header] + b"\x21\xfe\x02ab\x00" * comments + gif[header:]


@cache
def rle_bmp(side: int = 1000) -> bytes:
    """An 8-bit run-length-encoded BMP of side x side pixels, each pixel its own run."""
    rows = b"".join(b"\x01\x07" * side + b"\x00\x00" for _ in range(side)) + b"\x00\x01"
    palette = b"\x00\x00\x00\x00" * 256
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 8, 1, len(rows), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset) + info + palette + rows


@cache
def stray_byte_jpeg(side: int = 1000, scans: int = 83_000) -> bytes:
    """`jpeg_bomb` with one stray byte after its first segment (APP0): libjpeg skips the byte
    and decodes every scan, so a walk that stops at the first byte that is not a marker counts
    none of them."""
    bomb = jpeg_bomb(side, scans)
    app0 = 4 + int.from_bytes(bomb[4:6], "big")
    return bomb[:app0] + b"\x00" + bomb[app0:]


@cache
def gif_unknown_byte_bomb(sub_blocks: int = 499_899) -> bytes:
    """A 100x30 GIF with one byte that is no GIF block (Pillow skips it) before one comment
    extension of `sub_blocks` one-byte sub-blocks (Pillow reads each in Python)."""
    buffer = io.BytesIO()
    Image.new("P", (100, 30)).save(buffer, format="GIF")
    gif = buffer.getvalue()
    header = 13 + (3 << ((gif[10] & 7) + 1) if gif[10] & 0x80 else 0)
    comment = b"\x21\xfe" + b"\x01a" * sub_blocks + b"\x00"
    return gif[:header] + b"\x00" + comment + gif[header:]
