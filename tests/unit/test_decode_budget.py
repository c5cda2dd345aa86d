"""The decoding budget: images whose structure makes decoding expensive are refused from their
bytes (markers, chunks, blocks) before Pillow decodes anything; ordinary files still pass."""

from __future__ import annotations

import asyncio
import io
import random
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import psutil
import pytest
from PIL import Image

from captchaops.data import standin, synthetic
from captchaops.model import preprocess
from captchaops.model.preprocess import InvalidImage, TooCostly, check_size, decode
from captchaops.serving.decoding import DecodeLimits, Decoders, Geometry
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


def test_truncated_structures_are_refused_by_the_walk() -> None:
    for data in (
        encode(captcha_like(), "JPEG", progressive=True)[:300],
        encode(captcha_like(), "JPEG")[:-2],  # everything but its end marker
        encode(captcha_like(), "PNG")[:40],
        encode(captcha_like(), "PNG")[:-12],  # everything but IEND
        encode(captcha_like("P"), "GIF")[:40],
        encode(captcha_like("P"), "GIF")[:-1],  # everything but the trailer
        encode(captcha_like(), "BMP")[:20],
    ):
        with pytest.raises(InvalidImage, match="cannot be decoded") as refused:
            preprocess.check_cost(data)
        assert not isinstance(refused.value, TooCostly)


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


def test_the_walks_fail_closed_on_what_they_do_not_understand() -> None:
    """Each walk refuses an unknown byte, block or marker (the decoder would skip it and read
    on), and bytes after the end marker, instead of accepting the file at that point."""
    jpeg, png = encode(captcha_like(), "JPEG"), encode(captcha_like(), "PNG")
    gif, bmp = encode(captcha_like("P"), "GIF"), encode(captcha_like(), "BMP")
    app0 = 4 + int.from_bytes(jpeg[4:6], "big")
    gif_blocks = 13 + (3 << ((gif[10] & 7) + 1))
    cases = {
        "jpeg stray byte": (jpeg[:app0] + b"\x00" + jpeg[app0:], "where a marker belongs"),
        "jpeg unknown marker": (jpeg[:2] + b"\xff\xf3\x00\x02" + jpeg[2:], "not one it reads"),
        "jpeg after its end": (jpeg + b"\xff\xd8" + jpeg[2:], "follow its end marker"),
        "png unknown critical chunk": (
            png[:33] + images.png_chunk(b"ZZZZ", b"") + png[33:],
            "unknown critical chunk",
        ),
        "png after IEND": (png + png, "follow its IEND chunk"),
        "gif unknown byte": (
            gif[:gif_blocks] + b"\x00" + gif[gif_blocks:],
            "where a block belongs",
        ),
        "gif unknown extension": (
            gif[:gif_blocks] + b"\x21\x99\x00" + gif[gif_blocks:],
            "extension at offset",
        ),
        "gif after its trailer": (gif + gif, "follow its trailer"),
        "bmp unknown header": (bmp[:14] + b"\x99" + bmp[15:], "header is not one it reads"),
        "bmp png inside": (bmp[:30] + b"\x05" + bmp[31:], "compression 5"),
    }
    for name, (data, words) in cases.items():
        with pytest.raises(InvalidImage, match=words):
            preprocess.check_cost(data)
        assert decode(encode(captcha_like(), "PNG")).size == (200, 50), name


@pytest.mark.parametrize(
    "data",
    [images.stray_byte_jpeg(), images.gif_unknown_byte_bomb()],
    ids=["stray-byte jpeg of 83,000 scans", "gif of 499,899 comment blocks behind one byte"],
)
def test_bombs_hidden_behind_one_unknown_byte_are_refused_in_a_millisecond(data: bytes) -> None:
    assert len(data) <= 1024 * 1024
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match="cannot be decoded"):
        check_size(data)
    assert time.perf_counter() - started < 0.05


def test_the_images_we_make_pass_the_walks() -> None:
    rng = random.Random(5)
    made = [standin.render("AB3DE", rng)[0] for _ in range(12)]
    made += [sample.image for sample in synthetic.generate(8, seed=3)]
    for data in made:
        preprocess.check_cost(data)


@pytest.fixture(scope="module")
def decoders() -> Iterator[Decoders]:
    """Two real decoding workers; images over 10 ms of CPU are stopped by the kernel."""
    pool = Decoders(DecodeLimits(workers=2, cpu_seconds=0.01))
    loop = asyncio.new_event_loop()
    loop.run_until_complete(pool.start())
    pool.loop = loop  # type: ignore[attr-defined]
    yield pool
    loop.run_until_complete(pool.stop())
    loop.close()


def run(pool: Decoders, images_: list[bytes], geometry: Geometry) -> np.ndarray:
    return pool.loop.run_until_complete(pool.decode(images_, geometry))  # type: ignore[attr-defined,no-any-return]


def test_the_workers_give_the_arrays_of_the_one_image_pipeline(decoders: Decoders) -> None:
    captchas = [sample.image for sample in synthetic.generate(19, seed=8)]
    captchas.append(encode(captcha_like("RGBA"), "PNG"))
    pixels = run(decoders, captchas, Geometry(32, 96, 1))
    assert pixels.shape == (20, 32, 96, 1) and pixels.dtype == np.uint8
    want = np.stack([preprocess.preprocess(data, 32, 96) for data in captchas])
    assert np.array_equal(preprocess.unit_range(pixels), want)
    rgb = run(decoders, captchas[:3], Geometry(20, 40, 3))
    want = np.stack([preprocess.preprocess(data, 20, 40, channels=3) for data in captchas[:3]])
    assert np.array_equal(preprocess.unit_range(rgb), want)


def test_a_worker_refuses_with_the_first_bad_image_s_number(decoders: Decoders) -> None:
    captchas = [sample.image for sample in synthetic.generate(11, seed=9)]
    with pytest.raises(ProtocolError) as refused:
        run(decoders, [*captchas, images.stray_byte_jpeg()], Geometry(32, 96, 1))
    assert (refused.value.status, refused.value.error) == (400, "invalid_image")
    assert refused.value.detail.startswith("image 11: the JPEG image cannot be decoded")


def test_a_worker_the_kernel_stops_for_cpu_is_replaced(decoders: Decoders) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (1000, 1000, 4), dtype=np.uint8)
    costly = encode(Image.fromarray(noise, "RGBA"), "PNG")  # about 35 ms of CPU to read
    before = decoders.replaced
    started = time.perf_counter()
    with pytest.raises(ProtocolError) as refused:
        run(decoders, [costly], Geometry(32, 96, 1))
    assert (refused.value.status, refused.value.error) == (422, "too_costly")
    assert "0.01 s of CPU" in refused.value.detail
    assert time.perf_counter() - started < 2.0
    assert decoders.replaced == before + 1
    captchas = [sample.image for sample in synthetic.generate(8, seed=10)]
    for _ in range(3):  # both workers, the new one included, answer
        assert run(decoders, captchas, Geometry(32, 96, 1)).shape == (8, 32, 96, 1)


def test_requests_sharing_a_call_that_ends_its_worker_are_each_answered_alone(
    decoders: Decoders,
) -> None:
    noise = np.random.default_rng(2).integers(0, 256, (1000, 1000, 4), dtype=np.uint8)
    costly = encode(Image.fromarray(noise, "RGBA"), "PNG")
    captchas = [sample.image for sample in synthetic.generate(3, seed=12)]
    geometry = Geometry(32, 96, 1)

    async def together() -> list[np.ndarray | BaseException]:
        requests = [[captchas[0]], [captchas[1], costly], [captchas[2]]]
        return await asyncio.gather(
            *(decoders.decode(images_, geometry) for images_ in requests), return_exceptions=True
        )

    first, costly_one, last = decoders.loop.run_until_complete(together())  # type: ignore[attr-defined]
    assert isinstance(first, np.ndarray) and isinstance(last, np.ndarray)
    assert isinstance(costly_one, ProtocolError), costly_one
    assert (costly_one.status, costly_one.error) == (422, "too_costly")
    want = np.stack([preprocess.preprocess(captchas[0], 32, 96)])
    assert np.array_equal(preprocess.unit_range(first), want)


def test_a_pool_stopped_while_it_replaces_a_worker_leaves_no_worker_running() -> None:
    """`stop` right after the kernel ended a worker, while its replacement is starting: the
    replacement is in no list yet, and left running it kept the forkserver alive, so the
    next `stop` in the process waited for it for ever (CI: a 600 s timeout)."""
    noise = np.random.default_rng(3).integers(0, 256, (1000, 1000, 4), dtype=np.uint8)
    costly = encode(Image.fromarray(noise, "RGBA"), "PNG")
    pool = Decoders(DecodeLimits(workers=1, cpu_seconds=0.01))
    before = set(psutil.Process().children(recursive=True))

    async def replace_then_stop() -> None:
        await pool.start()
        with pytest.raises(ProtocolError):
            await pool.decode([costly], Geometry(32, 96, 1))
        await asyncio.sleep(0)  # the slot is now starting the replacement
        await asyncio.wait_for(pool.stop(), timeout=20)

    asyncio.run(replace_then_stop())
    started = [p for p in psutil.Process().children(recursive=True) if p not in before]
    _, alive = psutil.wait_procs(
        [p for p in started if "resource_tracker" not in " ".join(p.cmdline())], timeout=10
    )
    assert alive == [], [(p.pid, p.cmdline()) for p in alive]


SERVER = """
import asyncio
from captchaops.serving.decoding import DecodeLimits, Decoders

async def main():
    await Decoders(DecodeLimits(workers=2)).start()
    print("ready", flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_a_server_killed_outright_leaves_no_decoding_process_behind() -> None:
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        helpers = psutil.Process(server.pid).children(recursive=True)
        assert len(helpers) >= 3, "a forkserver, its workers and a resource tracker"
    finally:
        server.kill()  # SIGKILL: no shutdown code runs in the server
        server.wait()
    _, alive = psutil.wait_procs(helpers, timeout=10)
    assert alive == [], [p.pid for p in alive]
