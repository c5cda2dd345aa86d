"""CPU per image of each stage a 64-image request goes through in our model server, measured
in this process on the served version's files: the ceiling the machine's cores put on images/s.

Stages: parsing the request body (JSON, base64 and the header checks, `serving.protocol`), decoding in a worker
(`model.decode_worker.decode_images`, the worker's own function, run here), the network at a
batch of 64 (`predict_pixels`) and the server's own share of the worker round trip (the parent's
CPU for `serving.decoding.Decoders.decode`). Their sum is what one image costs; cores divided by
it is the most images/s the stages allow, before the load generator, HTTP and batching take any.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.cpu_quota import cores_allowed


def _cpu_per_call(step: Callable[[], Any], calls: int) -> float:
    """CPU seconds of this process per call of `step` (after one call not counted)."""
    step()
    started = time.process_time()
    for _ in range(calls):
        step()
    return (time.process_time() - started) / calls


def stage_costs(model_dir: Path, body: bytes, calls: int = 20) -> dict[str, float]:
    """Microseconds of CPU per image of each stage, for the request `body` and the version in
    `model_dir`; also `total_us` and `ceiling_img_s` (cores / total)."""
    from captchaops.model import decode_worker
    from captchaops.model.version import open_version
    from captchaops.serving import protocol
    from captchaops.serving.decoding import DecodeLimits, Decoders, geometry_of

    limits = protocol.Limits(max_body_bytes=len(body) + 1, max_image_bytes=2**20, max_images=64)
    images = protocol.parse_body(body, limits)
    max_pixels = DecodeLimits().max_pixels

    def parse() -> Any:
        return protocol.check_images(protocol.parse_body(body, limits), max_pixels)

    count = len(images)
    model = open_version(model_dir)
    geometry = geometry_of(model.meta)
    shape = (geometry.height, geometry.width, geometry.channels)
    limit = DecodeLimits()

    def decode() -> Any:
        return decode_worker.decode_images(images, *shape, limit.max_pixels, 10.0)[0]

    pixels = decode()
    costs = {
        "parse_us": _cpu_per_call(parse, calls),
        "decode_us": _cpu_per_call(decode, calls),
        "network_us": _cpu_per_call(lambda: model.predict_pixels(pixels), calls),
        "round_trip_us": asyncio.run(_parent_cpu(Decoders(limit), images, geometry, calls)),
    }
    costs = {stage: seconds / count * 1e6 for stage, seconds in costs.items()}
    total = sum(costs.values())
    cores = cores_allowed()  # a --half-speed run has one core's worth, whatever the count
    return costs | {"total_us": total, "cores": cores, "ceiling_img_s": cores * 1e6 / total}


async def _parent_cpu(decoders: Any, images: list[bytes], geometry: Any, calls: int) -> float:
    """The server's CPU per `Decoders.decode` of `images` (the workers' own CPU not counted)."""
    await decoders.start()
    try:
        await decoders.decode(images, geometry)
        started = time.process_time()
        for _ in range(calls):
            await decoders.decode(images, geometry)
        return (time.process_time() - started) / calls
    finally:
        await decoders.stop()


def print_costs(costs: dict[str, float]) -> None:
    """One line per stage and the ceiling."""
    print("CPU per image of a 64-image request, by stage (this process, idle servers):")
    for stage in ("parse_us", "decode_us", "network_us", "round_trip_us"):
        print(f"  {stage.removesuffix('_us'):<11} {costs[stage]:7.1f} us")
    print(
        f"  total       {costs['total_us']:7.1f} us -> at most "
        f"{costs['ceiling_img_s']:.0f} img/s with {costs['cores']:g} cores of CPU time"
    )
