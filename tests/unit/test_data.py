"""Data: reproducible synthetic sets, the labelled-folder reader, deterministic splits, digests."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import captcha.image
import pytest
from PIL import Image

from captchaops.data import standin, synthetic
from captchaops.data.dataset import DataError, LabelledImages, split_indices, split_of
from captchaops.data.folder import read_folder


def png(mode: str = "RGBA", size: tuple[int, int] = (200, 50), fmt: str = "PNG") -> bytes:
    image = Image.new("RGB", size, (240, 240, 240))
    image.paste((10, 10, 10), (20, 10, 60, 40))
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def test_same_seed_same_bytes_and_module_restored() -> None:
    first = synthetic.generate(8, seed=7)
    again = synthetic.generate(8, seed=7)
    other = synthetic.generate(8, seed=8)
    assert first == again
    assert [s.image for s in first] != [s.image for s in other]
    assert captcha.image.secrets.__name__ == "secrets"


def test_samples_follow_alphabet_length_and_size() -> None:
    samples = synthetic.generate(20, seed=1, alphabet="XYZ", length=(2, 5), width=120, height=40)
    assert all(set(s.label) <= set("XYZ") and 2 <= len(s.label) <= 5 for s in samples)
    assert len({len(s.label) for s in samples}) > 1
    assert Image.open(io.BytesIO(samples[0].image)).size == (120, 40)


def test_worker_count_does_not_change_the_set() -> None:
    n = synthetic._CHUNK + 5
    assert synthetic.generate(n, seed=3, workers=2) == synthetic.generate(n, seed=3)


def test_a_draw_stops_at_its_deadline_with_a_prefix_of_the_same_set() -> None:
    """A fixed set drawn under the training budget: whole chunks of 500 drawn by the deadline
    (at least one), the very images an unhurried draw starts with, on any worker count."""
    import time

    n = 1200
    whole = synthetic.generate(n, seed=5)
    assert synthetic.generate(n, seed=5, deadline=time.monotonic()) == whole[:500]
    late = synthetic.generate(n, seed=5, workers=2, deadline=time.monotonic() + 0.5)
    assert len(late) in (500, 1000) and late == whole[: len(late)]
    assert synthetic.generate(n, seed=5, workers=2, deadline=time.monotonic() + 600) == whole


def test_generate_one_is_reproducible_only_with_a_seed() -> None:
    assert synthetic.generate_one(42) == synthetic.generate_one(42)
    assert synthetic.generate_one().image != synthetic.generate_one().image
    assert len(synthetic.generate_one(1).label) == 4


def test_folder_labels_come_from_stems_in_any_format(tmp_path: Path) -> None:
    (tmp_path / "2b827.png").write_bytes(png("RGBA"))
    (tmp_path / "abc.jpg").write_bytes(png("RGB", fmt="JPEG"))
    (tmp_path / "x9.gif").write_bytes(png("P", fmt="GIF"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "77.BMP").write_bytes(png("RGB", fmt="BMP"))
    data = read_folder(tmp_path)
    assert sorted(data.labels) == ["2b827", "77", "abc", "x9"]
    assert data.alphabet() == "2789abcx"
    assert data.skipped.total == 0


def test_bad_files_are_counted_with_examples_and_skipped(tmp_path: Path) -> None:
    (tmp_path / "good1.png").write_bytes(png())
    (tmp_path / "bad1.png").write_bytes(b"not really a png")
    (tmp_path / "bad2.png").write_bytes(png()[:40])
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "bad label.png").write_bytes(png())
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "GOOD.png").write_bytes(png())
    data = read_folder(tmp_path, alphabet="abdgo12")
    assert data.labels == ["good1"]
    assert data.skipped.counts == {
        "unreadable image": 2,
        "not an image file": 1,
        "no usable label in the file name": 1,
        "label has characters outside the alphabet": 1,
    }
    assert "bad1.png" in data.skipped.summary()


def test_empty_or_unusable_folder_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no usable images") as info:
        read_folder(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "a.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"1 unreadable image \(e\.g\. a\.png\)"):
        read_folder(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        read_folder(tmp_path / "missing")


def test_separator_takes_the_label_before_it(tmp_path: Path) -> None:
    (tmp_path / "AB12_0f3e.png").write_bytes(png())
    assert read_folder(tmp_path, separator="_").labels == ["AB12"]


SPLIT_IN_ANOTHER_PROCESS = """
import json
from captchaops.data.dataset import split_indices
print(json.dumps(split_indices([f"img{i}.png" for i in range(4000)], 0.1, 0.2)))
"""


def test_split_is_deterministic_and_proportional() -> None:
    names = [f"img{i}.png" for i in range(4000)]
    splits = split_indices(names, val_fraction=0.1, test_fraction=0.2)
    by_name = {split: sorted(names[i] for i in idx) for split, idx in splits.items()}
    backwards = names[::-1]
    again = split_indices(backwards, 0.1, 0.2)
    assert {split: sorted(backwards[i] for i in idx) for split, idx in again.items()} == by_name
    other_process = subprocess.run(
        [sys.executable, "-c", SPLIT_IN_ANOTHER_PROCESS],
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(other_process.stdout) == splits
    assert 0.17 < len(splits["test"]) / 4000 < 0.23
    assert 0.07 < len(splits["val"]) / 4000 < 0.13
    for name, idx in splits.items():
        assert all(split_of(names[i], 0.1, 0.2) == name for i in idx)
    assert sorted(i for idx in splits.values() for i in idx) == list(range(4000))


def test_digest_depends_on_content_not_order() -> None:
    a = LabelledImages([b"1", b"2"], ["A", "B"], ["a.png", "b.png"], "x")
    b = LabelledImages([b"2", b"1"], ["B", "A"], ["b.png", "a.png"], "x")
    c = LabelledImages([b"1", b"3"], ["A", "B"], ["a.png", "b.png"], "x")
    assert a.digest() == b.digest() != c.digest()
    assert len(a.digest()) == 64


def test_subset_keeps_rows_aligned() -> None:
    data = LabelledImages([b"1", b"2", b"3"], ["A", "B", "C"], ["a", "b", "c"], "x")
    part = data.subset([2, 0])
    assert (part.images, part.labels, part.names) == ([b"3", b"1"], ["C", "A"], ["c", "a"])
    assert len(data) == 3


def test_standin_folder_is_shaped_like_a_real_one(tmp_path: Path) -> None:
    paths = standin.build(tmp_path, count=120, seed=5)
    assert len(paths) == 120 == len({p.stem for p in paths})
    data = read_folder(tmp_path)
    assert data.skipped.total == 0 and len(data) == 120
    assert set(data.alphabet()) <= set(standin.ALPHABET)
    assert {len(label) for label in data.labels} == {standin.LENGTH}
    modes = set()
    for image in data.images:
        opened = Image.open(io.BytesIO(image))
        assert opened.size == standin.SIZE
        modes.add((opened.format, opened.mode))
    assert ("PNG", "RGBA") in modes and ("JPEG", "RGB") in modes and ("PNG", "L") in modes
    again = standin.build(tmp_path / "again", count=120, seed=5)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


def test_standin_renderer_differs_from_the_training_generator() -> None:
    import random

    from captchaops.model.preprocess import preprocess

    label = "2b8c7"
    ours, _ = standin.render(label, random.Random(1))
    theirs = synthetic.generate_one(
        1, alphabet=standin.ALPHABET, length=(5, 5), width=200, height=50
    )
    a, b = preprocess(ours, 32, 128), preprocess(theirs.image, 32, 128)
    assert abs(float(a.mean()) - float(b.mean())) > 0.01 or float(abs(a - b).mean()) > 0.1
