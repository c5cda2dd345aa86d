"""Gate benchmark: wall time of `promote --auto`'s decision for two models on a 2,000-image frozen set.

Usage:
  python -m benchmarks gate                          # via `make bench`
  python -m benchmarks.bench_gate [--size 2000] [--cores 2]

Everything runs in one invocation on this machine: a private tracking server, two
versions at the demo architecture (trained for a moment: speed, not accuracy, is
measured), the frozen set stored on the server, then `gate.decide` timed end to end
(download the set by digest, load both models through pyfunc, batched prediction,
single-image latency). Prints the time against the target.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks import record

TARGET_S = 30.0


def main(argv: list[str] | None = None) -> None:
    """Train two versions, freeze the set, time the gate, print the result against the target."""
    parser = argparse.ArgumentParser(prog="bench_gate")
    parser.add_argument("--size", type=int, default=2000, help="frozen set size")
    parser.add_argument("--cores", type=int, default=2, help="CPU cores to pin this process to")
    args = parser.parse_args(argv or [])
    cores = sorted(os.sched_getaffinity(0))[: args.cores]
    os.sched_setaffinity(0, cores)

    from captchaops import mlflow_scope
    from captchaops.decisions import gate, promotion
    from captchaops.evaluation import evalset
    from captchaops.registry import aliases
    from captchaops.settings import load_settings
    from captchaops.training.run import TrainConfig, train
    from harness.processes import tracking_server
    from harness.stack import share_signing_key

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        share_signing_key(home)  # the in-process assign_alias signs with the settings' key
        with tracking_server(home) as server:
            settings = load_settings(home=home, tracking_uri=server.uri, staging_floor=0.0)
            quick = replace(TrainConfig(), synthetic=256, epochs=1, max_minutes=2.0, workers=1)
            champion = train(quick, settings).version
            candidate = train(replace(quick, seed=1), settings).version

            began = time.perf_counter()
            frozen = evalset.create_evalset(mlflow_scope.client(settings), settings, size=args.size)
            create_s = time.perf_counter() - began
            promotion.promote(settings, version=champion, reason="benchmark champion", force=True)
            client = mlflow_scope.client(settings)
            aliases.assign_alias(
                client,
                settings.model_name,
                "staging",
                candidate,
                reason="benchmark candidate",
                actor="bench_gate",
            )

            began = time.perf_counter()
            decision = gate.decide(settings)
            gate_s = time.perf_counter() - began

    c, p = decision.candidate, decision.champion
    assert c is not None and p is not None and c.ok and p.ok, decision.refusals
    print(f"cores: {len(cores)}  frozen set: {len(frozen)} images ({frozen.digest[:12]})")
    print(f"frozen set created and stored once: {create_s:.1f} s")
    for role, result in (("candidate", c), ("champion", p)):
        print(
            f"{role} v{result.version}: accuracy {result.seq_acc:.4f}  CER {result.cer:.4f}  "
            f"p50 {result.p50_ms:.2f} ms  p95 {result.p95_ms:.2f} ms"
        )
    verdict = "meets" if gate_s <= TARGET_S else "MISSES"
    print(
        f"gate wall time, two models: {gate_s:.1f} s (target <= {TARGET_S:.0f} s: {verdict}, "
        f"{gate_s / TARGET_S:.2f}x of budget)"
    )
    record.save(
        "gate",
        {
            "cores": len(cores),
            "images": len(frozen),
            "create_s": create_s,
            "gate_s": gate_s,
            "target_s": TARGET_S,
            "candidate": {"p50_ms": c.p50_ms, "p95_ms": c.p95_ms},
            "champion": {"p50_ms": p.p50_ms, "p95_ms": p.p95_ms},
        },
        {"gate on the frozen set": f"{gate_s:.1f} s ({len(frozen)} images)"},
    )


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
