"""Attack benchmark on a whole stack: the hostile inputs of tests/e2e/test_attacks.py, timed.

Usage:
  python -m benchmarks attacks_e2e                   # via `make bench`
  python -m benchmarks.bench_attacks_e2e [--repeats N]

One stack started by `captchaops up` in a temporary home (a tiny model trained for seconds and
gated to @production and @staging), then every input issue 14 lists against the model server,
the web app's API and its forms. Prints one table: input, endpoint, answers by status, server
errors (>= 500, a 503 with Retry-After excepted), median time to a refusal (in brackets: to
any answer, where nothing was refused), and whether anything
held before (runs, versions, aliases, audit trail, corrections) was lost or a normal request
failed after that input. Targets (issue 14): 0 server errors, 0 data lost.
The stray-byte JPEG and the GIF of comment blocks behind one byte (issue 35) are also sent by
four clients at once while a normal client asks: its p99 is printed beside its idle p99.
benchmarks/bench_attack.py measures the model server alone (bombs' cost, a normal client's p99
under batch attack, peak RSS).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import record
from captchaops.registry.aliases import resolve_alias
from captchaops.registry.names import PRODUCTION
from harness import attack_stack, attacks
from harness.attacks import Outcome, Targets
from harness.stack import PrivateStack, snapshot


def main(argv: list[str] | None = None) -> None:
    """Start a stack, run every attack, print the table and the verdict."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_attacks_e2e")
    parser.add_argument("--repeats", type=int, default=5, help="tries of each bad input")
    args = parser.parse_args(argv or [])
    started = time.monotonic()
    load = os.getloadavg()
    with (
        tempfile.TemporaryDirectory(prefix="bench-attacks-") as work,
        attack_stack.attacked_stack(Path(work) / "home") as (stack, targets),
    ):
        print(f"stack up with a tiny model in {time.monotonic() - started:.0f}s", flush=True)
        p99: dict[str, float] = {}
        rows = attack_all(stack, targets, args.repeats, p99)
    print_table(rows)
    errors = sum(o.server_errors() for o, _ in rows)
    lost = sum(bool(problems) for _, problems in rows)
    for outcome, problems in rows:
        for line in outcome.failures() + problems:
            print(f"  {line}")
    print(
        f"server errors: {errors} (target 0); inputs after which data was lost or a normal "
        f"request failed: {lost} (target 0); load average {load[0]:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after, {os.cpu_count()} CPUs; "
        f"{time.monotonic() - started:.0f}s in all"
    )
    figures = {
        "server errors (5xx) over every hostile input": f"{errors} (target 0)",
        "inputs after which data was lost or a normal request failed": f"{lost} (target 0)",
    }
    if p99:
        target = max(5 * p99["idle"], 250.0)
        figures["normal client p99 beside 4 clients sending decode bombs"] = (
            f"{p99['attacked']:.0f} ms, idle {p99['idle']:.0f} ms (target <= {target:.0f} ms)"
        )
    for outcome, _ in rows:
        if outcome.name.startswith(FIGURE_ROWS):
            refusal = outcome.median_refusal_ms()
            statuses = ", ".join(f"{s}: {n}" for s, n in outcome.by_status().items())
            when = answered(outcome) if refusal is None else f"refused in {refusal:.0f} ms"
            figures[f"{outcome.name} to {outcome.endpoint}"] = f"{statuses}; {when}"
    result = {
        "rows": [
            {
                "input": o.name,
                "endpoint": o.endpoint,
                "by_status": {str(k): v for k, v in o.by_status().items()},
                "server_errors": o.server_errors(),
                "median_refusal_ms": o.median_refusal_ms(),
                "problems": problems,
            }
            for o, problems in rows
        ],
        "p99_ms": p99,
        "load_before": load[0],
        "cpus": os.cpu_count(),
    }
    record.save("attacks", result, figures)


FIGURE_ROWS = ("stray-byte jpeg", "gif, 499,899 blocks")
"""Rows whose answers become figures of the record (issue 35's two parser bypasses)."""


def attack_all(
    stack: PrivateStack, targets: Targets, repeats: int, p99: dict[str, float]
) -> list[tuple[Outcome, list[str]]]:
    """Each attack in turn, with what was lost (or failed to answer) after it; `p99` gets the
    normal client's p99 (ms) beside the decode bombs (`attacked`) and idle (`idle`)."""
    settings = stack.settings()
    first = attack_stack.duplicates(targets, seed=1)
    assert first.answers[0].status == 201, first.answers
    version = resolve_alias(settings, PRODUCTION)
    assert version is not None
    before, stored = snapshot(settings), attack_stack.stored_artifacts(settings)

    def check() -> list[str]:
        problems = attack_stack.lost(before, snapshot(settings))
        if not stored <= attack_stack.stored_artifacts(settings):
            problems.append("a correction stored before is gone")
        return problems + attack_stack.still_serving(targets, version)

    rows: list[tuple[Outcome, list[str]]] = []

    def run(attack: Callable[[], list[Outcome]]) -> None:
        outcomes = attack()
        problems = check()
        rows.extend((o, problems) for o in outcomes)

    run(lambda: attacks.probe_all(targets, repeats))

    def slow() -> list[Outcome]:
        slow_model, slow_app, normal = attacks.during_slowloris(targets)
        return [slow_model, slow_app, *normal]

    run(slow)

    def decode_bombs() -> list[Outcome]:
        bombs, normal, idle = attacks.during_decode_bombs(targets)
        p99.update(attacked=attacks.p99_ms(normal), idle=attacks.p99_ms(idle))
        print(
            f"normal client p99: {attacks.p99_ms(normal):.0f} ms beside 4 clients sending decode "
            f"bombs, {attacks.p99_ms(idle):.0f} ms idle (target <= max(5 x idle, 250 ms))",
            flush=True,
        )
        return [*bombs, normal, idle]

    run(decode_bombs)
    run(lambda: attacks.flood(targets))
    run(lambda: [attack_stack.duplicates(targets, seed=2)])
    run(lambda: [attack_stack.junk_answered(targets, seed=3)])

    def burst() -> list[Outcome]:
        outcome, accepted = attack_stack.correction_burst(targets, first_seed=1000)
        stored.update(accepted)  # each accepted correction must stay stored too
        return [outcome]

    run(burst)
    run(lambda: attack_stack.foreign_host(targets))
    if targets.app_remote:
        run(lambda: attack_stack.review_from_elsewhere(targets))
    return rows


def print_table(rows: list[tuple[Outcome, list[str]]]) -> None:
    print(
        f"{'input':36} {'endpoint':22} {'answers by status':24} {'5xx':>3} "
        f"{'refused in (median)':>19}  data lost"
    )
    for outcome, problems in rows:
        refusal = outcome.median_refusal_ms()
        statuses = ", ".join(f"{s}: {n}" for s, n in outcome.by_status().items())
        print(
            f"{outcome.name:36} {outcome.endpoint:22} {statuses:24} "
            f"{outcome.server_errors():>3} "
            f"{answered(outcome) if refusal is None else f'{refusal:.1f} ms':>19}  "
            f"{'yes' if problems else 'no'}"
        )


def answered(outcome: Outcome) -> str:
    """Nothing refused: the median time to any answer, in brackets."""
    times = [a.seconds for a in outcome.answers]
    return f"({statistics.median(times) * 1000:.0f} ms)" if times else "-"


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
