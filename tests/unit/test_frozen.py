"""The frozen set's archive is read with bounded bytes: an amplified or malformed zip is refused."""

from __future__ import annotations

import io
import json
import resource
import tracemalloc
import zipfile

import pytest

from captchaops.data import frozen
from captchaops.data.frozen import ArchiveRefused, ArchiveTooLarge, pack, unpack

BIG = 40 * 2**20


def amplified(copies: int = 200, distinct: bool = False) -> bytes:
    """The attack: one 40 MiB entry (deflated to a few dozen KB) that labels.json names `copies`
    times; with `distinct`, as many different entries of 3 MiB each."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        if distinct:
            names = [f"images/{i:06d}.bin" for i in range(copies)]
            for name in names:
                archive.writestr(name, bytes(3 * 2**20))
        else:
            names = ["images/000000.bin"] * copies
            archive.writestr(names[0], bytes(BIG))
        items = [{"file": name, "label": "ABCD"} for name in names]
        archive.writestr("labels.json", json.dumps({"seed": 0, "items": items}))
    return buffer.getvalue()


def test_a_set_packs_and_unpacks_unchanged() -> None:
    images, labels = [b"\x89PNG one", b"\x89PNG two"], ["AB12", "CD34"]
    meta, back, read_labels = unpack(pack(images, labels, {"seed": 7, "kind": "folder"}))
    assert (back, read_labels) == (images, labels)
    assert meta["seed"] == 7 and meta["kind"] == "folder"


def test_one_entry_named_200_times_is_refused_in_one_line_without_unpacking_it() -> None:
    data = amplified()
    assert len(data) < 100_000  # about 41 KB for 8 GB of labelled images
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveRefused) as refused:
            unpack(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert str(refused.value) == "its labels.json names one image more than once"
    assert peak < 16 * 2**20 and grown < 64 * 2**10


def test_an_entry_larger_than_its_header_says_is_cut_at_the_limit() -> None:
    data = amplified(1)
    with pytest.raises(ArchiveTooLarge, match=r"images/000000\.bin takes it past 4 MiB"):
        unpack(data)
    forged = bytearray(data)  # the local and central headers both claim 100 bytes
    for offset in (i for i in range(len(forged)) if forged[i : i + 4] == b"PK\x03\x04"):
        forged[offset + 22 : offset + 26] = (100).to_bytes(4, "little")
        break
    for offset in (i for i in range(len(forged)) if forged[i : i + 4] == b"PK\x01\x02"):
        forged[offset + 24 : offset + 28] = (100).to_bytes(4, "little")
        break
    with pytest.raises(ArchiveRefused):
        unpack(bytes(forged))


def test_distinct_entries_stop_at_the_whole_set_limit() -> None:
    data = amplified(12, distinct=True)
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveTooLarge, match="takes it past"):
            unpack(data, max_unpacked=16 * 2**20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20


@pytest.mark.parametrize(
    ("archive", "reason"),
    [
        ({"other.txt": b"x"}, "it holds no labels.json"),
        ({"labels.json": b"\xff"}, "its labels.json is not JSON"),
        ({"labels.json": b"[]"}, "its labels.json holds no list of items"),
        ({"labels.json": b'{"items": [{"file": "a"}]}'}, "without a file name and a label"),
        ({"labels.json": b'{"items": [{"file": "a", "label": "x"}]}'}, "'a', which it does not"),
    ],
)
def test_a_malformed_set_is_refused_with_its_reason(archive: dict[str, bytes], reason: str) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, content in archive.items():
            zf.writestr(name, content)
    with pytest.raises(ArchiveRefused, match=reason):
        unpack(buffer.getvalue())
    with pytest.raises(ArchiveRefused, match="not a readable zip archive"):
        unpack(b"PK not a zip")


def test_too_many_items_and_other_compressions_are_refused() -> None:
    data = pack([b"a", b"b", b"c"], ["1", "2", "3"], {"seed": 0})
    with pytest.raises(ArchiveRefused, match="more than 2 images"):
        unpack(data, max_items=2)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_BZIP2) as archive:
        archive.writestr("images/0.bin", bytes(1000))
        archive.writestr(
            "labels.json", json.dumps({"items": [{"file": "images/0.bin", "label": "1"}]})
        )
    with pytest.raises(ArchiveRefused, match="compressed with a method"):
        unpack(buffer.getvalue())
    assert frozen.MAX_SET_BYTES <= 128 * 2**20
