"""A stand-in for a real CAPTCHA folder: 200x50, 5 characters, a renderer unlike `synthetic`'s.

No real data set can be downloaded here, so tests and benchmarks train on this instead of our
own generator: DejaVu fonts (shipped with matplotlib) instead of the `captcha` package's,
a strike-through curve, blur, grain, RGBA with a transparent margin, and a few JPEGs, written
as `<label>.png` / `<label>.jpg` files exactly like a team's own folder.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ALPHABET = "2345678bcdefgmnpwxy"
"""The 19 characters of the public 200x50 set this stands in for."""
LENGTH = 5
SIZE = (200, 50)
FONTS = ("DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSans.ttf", "DejaVuSerif.ttf")


@dataclass(frozen=True)
class Style:
    """How the stand-in draws: everything that makes it unlike the training generator."""

    width: int = SIZE[0]
    height: int = SIZE[1]
    jpeg_fraction: float = 0.05
    transparent_fraction: float = 0.7


def _font_dir() -> Path:
    # here, not at the top: matplotlib (it carries the DejaVu TrueType fonts) is the train extra's
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@cache
def _fonts(size: int) -> tuple[ImageFont.FreeTypeFont, ...]:
    folder = _font_dir()
    return tuple(ImageFont.truetype(str(folder / name), size) for name in FONTS)


def render(label: str, rng: random.Random, style: Style = Style()) -> tuple[bytes, str]:
    """One CAPTCHA showing `label`: (encoded bytes, file suffix '.png' or '.jpg')."""
    w, h = style.width, style.height
    background = rng.randint(200, 245)
    canvas = Image.new("L", (w, h), background)
    draw = ImageDraw.Draw(canvas)
    font = rng.choice(_fonts(rng.randint(26, 32)))
    ink = rng.randint(20, 90)
    x = rng.uniform(8, 30)
    advance = (w - x - 12) / len(label)
    for ch in label:
        glyph = Image.new("L", (48, 56), 0)
        ImageDraw.Draw(glyph).text((8, 4), ch, font=font, fill=255)
        glyph = glyph.rotate(rng.uniform(-18, 18), resample=Image.Resampling.BILINEAR)
        y = rng.uniform(-7, 0)
        canvas.paste(ink, (int(x) - 8, int(y)), glyph)
        x += advance * rng.uniform(0.8, 1.05)
    # A strike-through curve across the text, like the public set's line.
    phase, amp, y0 = rng.uniform(0, math.tau), rng.uniform(2, 7), rng.uniform(h * 0.35, h * 0.65)
    period = rng.uniform(18, 40)
    points = [(px, y0 + amp * math.sin(phase + px / period)) for px in range(0, w, 4)]
    draw.line(points, fill=ink, width=rng.randint(1, 3))
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.1)))
    pixels = np.asarray(canvas, dtype=np.float32)
    grain = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(4, 14), pixels.shape)
    gray = Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8), "L")
    buffer = io.BytesIO()
    if rng.random() < style.jpeg_fraction:
        gray.convert("RGB").save(buffer, format="JPEG", quality=rng.randint(60, 90))
        return buffer.getvalue(), ".jpg"
    if rng.random() < style.transparent_fraction:
        rgba = gray.convert("RGBA")
        alpha = np.full((h, w), 255, np.uint8)
        alpha[:, : rng.randint(0, 6)] = 0  # transparent margins read as white
        alpha[:, w - rng.randint(0, 6) :] = 0
        rgba.putalpha(Image.fromarray(alpha, "L"))
        rgba.save(buffer, format="PNG")
    else:
        gray.save(buffer, format="PNG")
    return buffer.getvalue(), ".png"


def build(folder: Path, count: int = 1040, seed: int = 0, style: Style = Style()) -> list[Path]:
    """Write `count` labelled CAPTCHAs (unique labels) into `folder`; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"standin/{seed}")
    seen: set[str] = set()
    paths: list[Path] = []
    while len(paths) < count:
        label = "".join(rng.choice(ALPHABET) for _ in range(LENGTH))
        if label in seen:
            continue
        seen.add(label)
        data, suffix = render(label, rng, style)
        path = folder / f"{label}{suffix}"
        path.write_bytes(data)
        paths.append(path)
    return paths
