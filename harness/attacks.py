"""Hostile inputs against a running stack: what tests/e2e/test_attacks.py asserts and
benchmarks/bench_attacks_e2e.py times (issue 14).

Every probe sends real HTTP to a model server (`/invocations`), the web app's API
(`/api/predict`, `/api/feedback`, `/api/review`) or its page forms (`/predict`, `/feedback`, with
a CSRF token from the page). An answer fails when its status is >= 500 (a 503 with Retry-After
is a documented overload refusal, not a failure) or is not one the probe expects.
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from urllib.parse import urlsplit

import httpx

from captchaops.data.synthetic import generate_one
from harness.images import (
    gif_comment_bomb,
    gif_unknown_byte_bomb,
    jpeg_bomb,
    png_chunk_bomb,
    stray_byte_jpeg,
)

REFUSALS = frozenset({400, 403, 409, 413, 415, 429})
EIGHT_MB = 8 * 1024 * 1024
JUNK_ANSWERED = 100_000
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class Answer:
    """One response: status, seconds until it came, its Retry-After and the start of its body."""

    status: int
    seconds: float
    retry_after: str | None = None
    body: str = ""

    def failed(self) -> bool:
        """A server error: >= 500, except a 503 that says when to retry (an overload refusal)."""
        return self.status >= 500 and not (self.status == 503 and self.retry_after)


@dataclass
class Outcome:
    """What one hostile input got: every answer, and which statuses it may get."""

    name: str
    endpoint: str
    expected: frozenset[int]
    answers: list[Answer] = field(default_factory=list)

    def failures(self) -> list[str]:
        """Answers that are server errors or not among the expected statuses."""
        return [
            f"{self.name} -> {self.endpoint}: HTTP {a.status} {a.body[:300]!r}"
            for a in self.answers
            if a.failed() or (a.status not in self.expected and a.status != 503)
        ]

    def by_status(self) -> dict[int, int]:
        return dict(sorted(Counter(a.status for a in self.answers).items()))

    def server_errors(self) -> int:
        return sum(a.failed() for a in self.answers)

    def median_refusal_ms(self) -> float | None:
        """Median time to a 4xx or 503 answer, in ms (None when nothing was refused)."""
        times = [a.seconds for a in self.answers if a.status >= 400]
        return statistics.median(times) * 1000 if times else None


@dataclass
class Targets:
    """Where the stack under attack answers; `app_remote`: the web app at a non-loopback
    address of this machine (None when it has none or the app listens on loopback only)."""

    model: str
    app: str
    app_remote: str | None = None


def answer_of(response: httpx.Response, started: float) -> Answer:
    return Answer(
        response.status_code,
        time.monotonic() - started,
        response.headers.get("Retry-After"),
        response.text[:500],
    )


def send(client: httpx.Client, method: str, url: str, **kwargs: Any) -> Answer:
    """One request; the answer with its timing."""
    started = time.monotonic()
    return answer_of(client.request(method, url, **kwargs), started)


# What is sent ---------------------------------------------------------------------------------


@cache
def bomb_png(side: int = 4000) -> bytes:
    """An all-white RGBA PNG: about 70 KB as a file, side * side * 4 bytes decoded."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGBA", (side, side), (255, 255, 255, 255)).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def scoring(*images: str) -> dict[str, Any]:
    """A model-server request body with these base64 images."""
    return {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}}


def captcha(seed: int = 7) -> bytes:
    return generate_one(seed).image


DEEP_JSON = b"[" * 200_000
TRUNCATED_B64 = b64(captcha())[:-3]
TRUNCATED_PNG = b64(captcha()[:200])
GARBAGE_B64 = "!!!! this is not base64 ~~~~"
BIG_BODY = b'{"image": "' + b"A" * EIGHT_MB + b'"}'
WIDE_JSON = b"[" + b"{}," * (2 * 1024 * 1024 // 3) + b"{}]"


def decode_bombs(
    body: Callable[[bytes], dict[str, Any]], ok: frozenset[int]
) -> list[tuple[str, dict[str, Any], frozenset[int]]]:
    """The bombs hidden behind one byte the old structure walks did not understand (issue 35),
    as probes whose request arguments `body` makes from the image bytes."""
    return [
        ("stray-byte jpeg of 83,000 scans", body(stray_byte_jpeg()), ok),
        ("gif, 499,899 blocks behind 1 byte", body(gif_unknown_byte_bomb()), ok),
    ]


def model_probes() -> list[tuple[str, dict[str, Any], frozenset[int]]]:
    """(input, request keyword arguments, statuses allowed) for POST /invocations."""
    bomb = b64(bomb_png())
    bad = frozenset({400, 413, 415})
    return [
        ("png bomb 4000x4000", {"json": scoring(bomb)}, bad),
        ("64 png bombs", {"json": scoring(*[bomb] * 64)}, bad),
        ("jpeg of 60,000 scans", {"json": scoring(b64(jpeg_bomb()))}, bad),
        ("png of 60,000 chunks", {"json": scoring(b64(png_chunk_bomb()))}, bad),
        ("gif of 120,000 comments", {"json": scoring(b64(gif_comment_bomb()))}, bad),
        *decode_bombs(lambda data: {"json": scoring(b64(data))}, bad),
        ("json 200,000 deep", {"content": DEEP_JSON, "headers": _json_type()}, bad),
        ("8 MB body", {"content": BIG_BODY, "headers": _json_type()}, bad),
        ("text/plain", {"content": json.dumps(scoring(b64(captcha()))), "headers": _text()}, bad),
        (
            "application/xml",
            {"content": b"<x/>", "headers": {"Content-Type": "application/xml"}},
            bad,
        ),
        ("multipart", {"files": {"image": ("a.png", captcha(), "image/png")}}, bad),
        ("garbage base64", {"json": scoring(GARBAGE_B64)}, bad),
        ("truncated base64", {"json": scoring(TRUNCATED_B64)}, bad),
        ("truncated png", {"json": scoring(TRUNCATED_PNG)}, bad),
    ]


def api_probes() -> list[tuple[str, dict[str, Any], frozenset[int]]]:
    """(input, request keyword arguments, statuses allowed) for POST /api/predict."""
    bomb = bomb_png()
    bad = frozenset({400, 413, 415})
    files = [("image", (f"b{i}.png", bomb, "image/png")) for i in range(64)]
    return [
        ("png bomb 4000x4000", {"json": {"image": b64(bomb)}}, bad),
        ("64 png bombs", {"files": files}, bad),
        ("jpeg of 60,000 scans", {"json": {"image": b64(jpeg_bomb())}}, bad),
        *decode_bombs(lambda data: {"json": {"image": b64(data)}}, bad),
        ("json 200,000 deep", {"content": DEEP_JSON, "headers": _json_type()}, bad),
        ("2 MiB of [{},{},...]", {"content": WIDE_JSON, "headers": _json_type()}, bad),
        ("8 MB body", {"content": BIG_BODY, "headers": _json_type()}, bad),
        ("text/plain", {"content": json.dumps({"image": b64(captcha())}), "headers": _text()}, bad),
        (
            "application/xml",
            {"content": b"<x/>", "headers": {"Content-Type": "application/xml"}},
            bad,
        ),
        ("garbage base64", {"json": {"image": GARBAGE_B64}}, bad),
        ("truncated base64", {"json": {"image": TRUNCATED_B64}}, bad),
        ("truncated png", {"json": {"image": TRUNCATED_PNG}}, bad),
    ]


def form_probes() -> list[tuple[str, dict[str, Any], frozenset[int]]]:
    """(input, request keyword arguments, statuses allowed) for the page's POST /predict (the
    CSRF token is added when sent)."""
    bomb = bomb_png()
    bad = frozenset({400, 413, 415})
    return [
        ("png bomb 4000x4000", {"files": {"image": ("b.png", bomb, "image/png")}}, bad),
        ("jpeg of 60,000 scans", {"files": {"image": ("b.jpg", jpeg_bomb(), "image/jpeg")}}, bad),
        (
            "64 png bombs",
            {"files": [("image", (f"b{i}.png", bomb, "image/png")) for i in range(64)]},
            bad,
        ),
        (
            "8 MB body",
            {"files": {"image": ("b.png", b"\x89PNG" + b"A" * EIGHT_MB, "image/png")}},
            bad,
        ),
        (
            "json body",
            {"content": json.dumps({"image": b64(captcha())}), "headers": _json_type()},
            bad,
        ),
        ("garbage bytes", {"files": {"image": ("b.png", b"GIF89a garbage", "image/png")}}, bad),
        ("truncated png", {"files": {"image": ("b.png", captcha()[:200], "image/png")}}, bad),
    ]


def _json_type() -> dict[str, str]:
    return {"Content-Type": "application/json"}


def _text() -> dict[str, str]:
    return {"Content-Type": "text/plain"}


# How it is sent -------------------------------------------------------------------------------


def csrf_token(client: httpx.Client, app: str) -> str:
    """The page's CSRF token (the client keeps the session cookie it belongs to)."""
    page = client.get(f"{app}/")
    found = CSRF.search(page.text)
    assert found, f"no CSRF token on the page (HTTP {page.status_code})"
    return found.group(1)


def probe_all(targets: Targets, repeats: int = 1) -> list[Outcome]:
    """Every bad-input probe against the model server, the API and the upload form."""
    outcomes = []
    with httpx.Client(timeout=60) as client:
        for name, kwargs, ok in model_probes():
            out = Outcome(name, "model /invocations", ok)
            out.answers = [
                send(client, "POST", f"{targets.model}/invocations", **kwargs)
                for _ in range(repeats)
            ]
            outcomes.append(out)
        for name, kwargs, ok in api_probes():
            out = Outcome(name, "app /api/predict", ok)
            out.answers = [
                send(client, "POST", f"{targets.app}/api/predict", **kwargs) for _ in range(repeats)
            ]
            outcomes.append(out)
        for name, kwargs, ok in form_probes():
            out = Outcome(name, "app /predict (form)", ok)
            for _ in range(repeats):
                token = csrf_token(client, targets.app)
                if "files" in kwargs:
                    kwargs = {**kwargs, "data": {"csrf_token": token}}
                out.answers.append(send(client, "POST", f"{targets.app}/predict", **kwargs))
            outcomes.append(out)
    return outcomes


def normal_model(client: httpx.Client, targets: Targets) -> Answer:
    return send(client, "POST", f"{targets.model}/invocations", json=scoring(b64(captcha())))


def normal_app(client: httpx.Client, targets: Targets) -> Answer:
    return send(client, "POST", f"{targets.app}/api/predict", json={"image": b64(captcha())})


def slowloris(
    url: str, body: bytes, connections: int = 8, seconds: float = 3.0
) -> tuple[list[Answer], threading.Thread]:
    """`connections` clients each sending a valid POST to `url` a byte every few ms for about
    `seconds` (headers and the start of the body), then the rest; their answers fill the list
    once the returned thread ends."""
    parts = urlsplit(url)
    head = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    request = head + body
    slow = min(len(request), 300)
    answers: list[Answer] = []

    def one() -> None:
        started = time.monotonic()
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), 30) as s:
            try:
                for i in range(slow):
                    s.sendall(request[i : i + 1])
                    time.sleep(seconds / slow)
                s.sendall(request[slow:])
                reply = s.recv(65536).decode("latin-1")
            except OSError as exc:  # the server may close a client that is too slow
                answers.append(Answer(0, time.monotonic() - started, body=repr(exc)))
                return
        status = int(reply.split(" ", 2)[1]) if reply.startswith("HTTP/") else 0
        retry = re.search(r"(?im)^retry-after:\s*(\S+)", reply)
        answers.append(
            Answer(
                status, time.monotonic() - started, retry.group(1) if retry else None, reply[:500]
            )
        )

    def all_of_them() -> None:
        with ThreadPoolExecutor(connections) as pool:
            list(pool.map(lambda _: one(), range(connections)))

    thread = threading.Thread(target=all_of_them, daemon=True)
    thread.start()
    return answers, thread


def during_slowloris(
    targets: Targets, seconds: float = 3.0
) -> tuple[Outcome, Outcome, list[Outcome]]:
    """Slow clients on the model server and the API while a normal client keeps asking both:
    (the slow clients' outcomes, the normal client's model answers, the normal client's app
    answers) -- returned as (model slow, app slow, [normal model, normal app])."""
    slow_model, model_thread = slowloris(
        f"{targets.model}/invocations",
        json.dumps(scoring(b64(captcha()))).encode(),
        seconds=seconds,
    )
    slow_app, app_thread = slowloris(
        f"{targets.app}/api/predict",
        json.dumps({"image": b64(captcha())}).encode(),
        seconds=seconds,
    )
    normal_m = Outcome("normal client during slowloris", "model /invocations", frozenset({200}))
    normal_a = Outcome("normal client during slowloris", "app /api/predict", frozenset({200}))
    with httpx.Client(timeout=30) as client:
        while model_thread.is_alive() or app_thread.is_alive():
            normal_m.answers.append(normal_model(client, targets))
            normal_a.answers.append(normal_app(client, targets))
    model_thread.join()
    app_thread.join()
    slow_ok = frozenset({0, 200, 400, 408})  # 0: the server hung up on a client too slow
    return (
        Outcome("slowloris (8 clients)", "model /invocations", slow_ok, slow_model),
        Outcome("slowloris (8 clients)", "app /api/predict", slow_ok, slow_app),
        [normal_m, normal_a],
    )


def flood(targets: Targets, clients: int = 32, each: int = 2) -> list[Outcome]:
    """`clients` concurrent clients each sending `each` normal requests to both servers:
    200, or 503 with Retry-After."""
    ok = frozenset({200, 503})
    outcomes = []
    for endpoint, ask in (("model /invocations", normal_model), ("app /api/predict", normal_app)):

        def client_run(
            _: int, ask: Callable[[httpx.Client, Targets], Answer] = ask
        ) -> list[Answer]:
            with httpx.Client(timeout=60) as client:
                return [ask(client, targets) for _ in range(each)]

        with ThreadPoolExecutor(clients) as pool:
            answers = [a for batch in pool.map(client_run, range(clients)) for a in batch]
        outcomes.append(Outcome(f"flood ({clients} concurrent)", endpoint, ok, answers))
    return outcomes


def during_decode_bombs(
    targets: Targets, attackers: int = 4, seconds: float = 5.0
) -> tuple[list[Outcome], Outcome, Outcome]:
    """`attackers` clients sending the decode bombs to the model server in turn for about
    `seconds` while one normal client asks it: (the bombs' outcomes, the normal client's
    answers meanwhile, the same client's answers on an idle server before)."""
    idle = Outcome("normal client, idle", "model /invocations", frozenset({200}))
    with httpx.Client(timeout=30) as client:
        idle.answers = [normal_model(client, targets) for _ in range(40)]
    bombs = decode_bombs(lambda data: {"json": scoring(b64(data))}, frozenset({400, 413, 422}))
    hit = [Outcome(f"{name} x{attackers}", "model /invocations", ok) for name, _, ok in bombs]
    stop = time.monotonic() + seconds

    def attacker(number: int) -> None:
        with httpx.Client(timeout=60) as client:
            turn = number
            while time.monotonic() < stop:
                kind = turn % len(bombs)
                hit[kind].answers.append(
                    send(client, "POST", f"{targets.model}/invocations", **bombs[kind][1])
                )
                turn += 1

    normal = Outcome(
        f"normal client, {attackers} bomb clients", "model /invocations", frozenset({200})
    )
    with ThreadPoolExecutor(attackers) as pool:
        running = [pool.submit(attacker, n) for n in range(attackers)]
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < stop:
                normal.answers.append(normal_model(client, targets))
        for future in running:
            future.result()
    return hit, normal, idle


def p99_ms(outcome: Outcome) -> float:
    """The 99th percentile of an outcome's answer times, in ms."""
    times = sorted(a.seconds for a in outcome.answers)
    return times[min(len(times) - 1, int(0.99 * len(times)))] * 1000 if times else 0.0
