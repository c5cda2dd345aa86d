"""The decoding budget: images whose structure makes decoding expensive are refused from their
bytes (markers, chunks, blocks) before Pillow decodes anything; ordinary files still pass."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from captchaops.model import preprocess
from captchaops.model.preprocess import InvalidImage, TooCostly, check_size, decode
from captchaops.serving.protocol import ProtocolError, check_images
from captchaops.webapp.inputs import BadInput, check_image
from harness import images


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def captcha_like(mode: str = "RGB") -> Image.Image:
    image = Image.new("RGB", (200, 50), (250, 250, 250))
    image.paste((20, 20, 20), (50, 10, 150, 40))
    return image.convert(mode)


@pytest.mark.parametrize(
    ("fmt", "mode", "options"),
    [
        ("JPEG", "RGB", {"progressive": True}),
        ("JPEG", "L", {"progressive": True}),
        ("JPEG", "CMYK", {"progressive": True}),
        ("JPEG", "RGB", {"subsampling": 0, "quality": 95}),
        ("PNG", "RGBA", {"optimize": True}),
        ("GIF", "P", {"comment": b"made by a test"}),
        ("BMP", "RGB", {}),
    ],
)
def test_ordinary_files_pass_the_structure_checks(
    fmt: str, mode: str, options: dict[str, object]
) -> None:
    data = encode(captcha_like(mode), fmt, **options)
    assert preprocess.check_cost(data) == fmt
    assert decode(data).size == (200, 50)


def test_an_animated_gif_within_the_frame_limit_decodes_its_first_frame() -> None:
    frames = [Image.new("P", (100, 30), i) for i in range(20)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert decode(buffer.getvalue()).size == (100, 30)


def test_a_progressive_jpeg_just_under_the_scan_limit_decodes() -> None:
    data = images.jpeg_bomb(side=64, scans=preprocess.MAX_JPEG_SCANS - 6)
    assert decode(data).size == (64, 64)


def test_a_jpeg_with_one_scan_too_many_is_refused() -> None:
    normal = encode(Image.new("L", (64, 64), 255), "JPEG", progressive=True)
    scans = sum(marker == 0xDA for marker, _ in images.jpeg_segments(normal))
    data = images.jpeg_bomb(side=64, scans=preprocess.MAX_JPEG_SCANS - scans + 2)
    with pytest.raises(TooCostly, match="more than 32 scans"):
        check_size(data)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (images.jpeg_bomb(), "scans"),
        (images.png_chunk_bomb(), "chunks"),
        (images.png_chunk_bomb(40, b"tEXt"), "text chunks"),
        (images.png_chunk_bomb(40, b"zTXt"), "text chunks"),
        (images.gif_comment_bomb(), "blocks"),
        (images.rle_bmp(), "run-length-encoded"),
    ],
    ids=["jpeg scans", "png chunks", "png tEXt", "png zTXt", "gif comments", "rle bmp"],
)
def test_expensive_structures_are_refused_before_decoding(data: bytes, words: str) -> None:
    with pytest.raises(TooCostly, match=words) as refused:
        decode(data)
    assert isinstance(refused.value, InvalidImage)
    assert "\n" not in str(refused.value)
    assert "; " in str(refused.value), "the message says what to do instead"


def test_a_jpeg_of_many_tiny_segments_is_refused() -> None:
    data = encode(captcha_like(), "JPEG")
    comment = b"\xff\xfe\x00\x03x"
    bomb = data[:2] + comment * (preprocess.MAX_JPEG_SEGMENTS + 1) + data[2:]
    with pytest.raises(TooCostly, match="marker segments"):
        check_size(bomb)


def test_a_gif_with_too_many_frames_is_refused() -> None:
    count = preprocess.MAX_GIF_FRAMES + 1
    frames = [Image.new("RGB", (8, 8), (i % 256, i // 256 * 99, 0)) for i in range(count)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(TooCostly, match="frames"):
        check_size(buffer.getvalue())


def test_truncated_structures_are_left_to_the_decoder_to_refuse() -> None:
    for data in (
        encode(captcha_like(), "JPEG", progressive=True)[:300],
        encode(captcha_like(), "PNG")[:40],
        encode(captcha_like("P"), "GIF")[:40],
    ):
        with pytest.raises(InvalidImage):
            decode(data)


def test_the_model_server_protocol_refuses_a_costly_image_with_its_own_code() -> None:
    with pytest.raises(ProtocolError) as refused:
        check_images([images.jpeg_bomb()], preprocess.MAX_PIXELS)
    assert (refused.value.status, refused.value.error) == (400, "too_costly")
    assert refused.value.detail.startswith("image 0: the JPEG holds more than")


def test_the_web_app_refuses_a_costly_image_with_a_400() -> None:
    with pytest.raises(BadInput) as refused:
        check_image(images.png_chunk_bomb(), 1024 * 1024)
    assert (refused.value.status, refused.value.error) == (400, "too_costly")
    assert refused.value.detail.startswith("The PNG holds more than")
