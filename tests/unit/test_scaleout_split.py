"""`tune` and `train --members` split their data as `train` does: the same images, held out and
split by name into the same train/val/test, before their runs go to Ray."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from captchaops.scaleout.sweep import prepare
from captchaops.settings import load_settings
from captchaops.training.loop import silent
from captchaops.training.prepare import prepared
from harness.training import tiny_config


def test_the_search_and_the_members_split_a_generated_set_as_train_does(tmp_path: Path) -> None:
    config = replace(tiny_config(), synthetic=60, fresh=False, val_fraction=0.2, test_fraction=0.2)
    settings = load_settings(home=tmp_path)
    searched = prepare(config, settings)
    with prepared(None, config, settings, silent) as preparation:  # type: ignore[arg-type]
        trained = preparation.prepared
        held = preparation.held_out()
    assert searched.data.names == held.data.names and len(searched.data) == 60
    assert searched.splits == held.splits
    assert all(searched.splits[name] for name in ("train", "val", "test"))
    assert searched.frozen is None and trained.frozen is None
    assert (searched.alphabet, searched.arch) == (trained.alphabet, trained.arch)
    assert searched.n_read == trained.n_read == 60
