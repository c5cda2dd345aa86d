"""Two model servers of one alias in one home: each claims a cache folder of its own, so
neither deletes the other's downloads (a server sweeps what it did not keep)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from captchaops.serving.loader import SLOTS, Timeouts, VersionLoader, claim_cache_dir


def test_a_second_claim_gets_a_slot_and_a_sweep_spares_it(tmp_path: Path) -> None:
    cache = tmp_path / "serving-cache" / "m" / "production"
    first = claim_cache_dir(cache)
    second = claim_cache_dir(
        cache
    )  # another open file description: flock treats it as another server
    assert first == cache
    assert second == cache / SLOTS / "1"
    kept = second / "version-abc"
    kept.mkdir()
    (kept / "model.onnx").write_bytes(b"x")
    (first / "version-old").mkdir()

    VersionLoader(None, first, Timeouts())._sweep(keep=None)  # type: ignore[arg-type]

    assert not (first / "version-old").exists()
    assert (kept / "model.onnx").read_bytes() == b"x"


def test_a_dead_servers_folder_is_claimed_again(tmp_path: Path) -> None:
    cache = tmp_path / "c"
    code = (
        "import sys; from pathlib import Path;"
        "from captchaops.serving.loader import claim_cache_dir;"
        "print(claim_cache_dir(Path(sys.argv[1])))"
    )
    env = dict(os.environ)
    first = subprocess.run(
        [sys.executable, "-c", code, str(cache)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert Path(first.stdout.strip()) == cache  # the process exited: its lock went with it
    assert claim_cache_dir(cache) == cache
