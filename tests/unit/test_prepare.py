"""Training's first stage hands the later ones data: the held-out and test images are computed
when the data is prepared, and nothing it hands over is a callable."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

from captchaops.settings import load_settings
from captchaops.training.loop import silent
from captchaops.training.prepare import HeldOut, Prepared, prepared
from harness.training import tiny_config


def test_prepared_and_held_out_declare_no_callable() -> None:
    for stage_data in (Prepared, HeldOut):
        callables = [f.name for f in fields(stage_data) if "Callable" in str(f.type)]
        assert callables == [], f"{stage_data.__name__} hands over work: {callables}"


def test_a_fixed_set_is_split_and_its_held_out_data_computed_before_fitting(
    tmp_path: Path,
) -> None:
    config = replace(tiny_config(), synthetic=60, fresh=False, val_fraction=0.2, test_fraction=0.2)
    settings = load_settings(home=tmp_path)
    with prepared(None, config, settings, silent) as preparation:  # type: ignore[arg-type]
        p = preparation.prepared
        held = p.held_out
        assert held is not None and p.val is not None  # in hand, not drawn later
        assert preparation.held_out() is held and preparation.val is p.val
        data, splits = held.data, held.splits
        assert held.digest == data.digest()
        assert data.arrays is None  # the generator's arrays live on in the fitted arrays only
        assert sorted(i for idx in splits.values() for i in idx) == list(range(len(data)))
        assert held.test_images == [data.images[i] for i in splits["test"]]
        assert held.test_labels == [data.labels[i] for i in splits["test"]]
        assert isinstance(p.train, tuple) and len(p.train[0]) == p.n_train == len(splits["train"])
        assert p.val.labels == [data.labels[i] for i in splits["val"]]
        assert len(data) == p.n_read == 60
