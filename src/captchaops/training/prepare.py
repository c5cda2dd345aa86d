"""Training's first stage: the data a config asks for, split, preprocessed or streamed.

`prepared` yields what `training.run.train` fits on: the fixed path's arrays (a folder with
its frozen set held out, or one generated set), or the fresh path's stream and its generators,
which stay up until the `with` block ends. It reads the tracking server only for the frozen
set, through the client it is given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from mlflow import MlflowClient

from captchaops.data import synthetic
from captchaops.data.corrections import download_feedback
from captchaops.data.dataset import DataError, LabelledImages, split_indices
from captchaops.data.folder import read_folder
from captchaops.evaluation.evalset import EvalSet, EvalSetError, folder_evalset
from captchaops.model.crnn import Architecture
from captchaops.model.ctc import encode_labels
from captchaops.settings import Settings
from captchaops.training import TrainError
from captchaops.training.config import TrainConfig
from captchaops.training.fresh import fresh_data
from captchaops.training.loop import Progress, Stream, Validation, arrays, geometry


def load_data(
    config: TrainConfig, settings: Settings, report: Progress, deadline: float | None = None
) -> LabelledImages:
    """The labelled images a config asks for (folder or generated, plus feedback if asked).

    A generated set is drawn until `deadline` (`time.monotonic()`) at the latest: a slower
    machine trains on fewer of the same images rather than spending its budget drawing."""
    if config.data_dir is not None:
        data = read_folder(config.data_dir, alphabet=config.alphabet)
    else:
        if config.synthetic < 10:
            raise DataError("--synthetic needs at least 10 images; try --synthetic 20000")
        report(f"generating {config.synthetic:,} CAPTCHAs", 0.0, {})
        samples = synthetic.generate(
            config.synthetic,
            config.seed,
            alphabet=config.alphabet or synthetic.DIGITS_UPPER,
            length=config.length,
            workers=config.workers,
            preprocess_to=(config.arch.height, config.arch.width),
            deadline=deadline,
        )
        if len(samples) < config.synthetic:
            report(f"drew {len(samples):,} of {config.synthetic:,} CAPTCHAs in the time", 0.0, {})
        data = LabelledImages(
            images=[s.image for s in samples],
            labels=[s.label for s in samples],
            names=[f"synthetic-{config.seed}-{i:07d}" for i in range(len(samples))],
            source=f"synthetic:{config.synthetic}:seed={config.seed}",
            arrays=[s.array for s in samples],
        )
    if config.include_feedback:
        folder = settings.home_dir / "feedback"
        download_feedback(settings, folder)
        if any(folder.glob("*")):
            alphabet = config.alphabet or (
                synthetic.DIGITS_UPPER if config.data_dir is None else data.alphabet()
            )
            try:
                extra = read_folder(folder, alphabet=alphabet, separator="_")
            except DataError:
                extra = None
            if extra is not None:
                extra.names = [f"feedback/{n}" for n in extra.names]
                data.extend(extra)
    return data


def _frozen_for_folder(
    client: MlflowClient,
    config: TrainConfig,
    settings: Settings,
    data: LabelledImages,
    report: Progress,
) -> tuple[EvalSet, LabelledImages]:
    """The scheme's frozen set (held out now on first use) and the data without any of it."""
    report("holding out the frozen evaluation set", 0.0, {})
    try:
        frozen = folder_evalset(client, settings, data, config.holdout_fraction)
    except EvalSetError as exc:
        raise TrainError(str(exc)) from exc
    keep = frozen.unseen(data.images)
    return frozen, data.subset(keep)


@dataclass
class Prepared:
    """What `train` fits on: the fixed path's arrays or the fresh path's stream."""

    kind: str
    alphabet: str
    lengths: tuple[int, int]
    arch: Architecture
    train: tuple[np.ndarray, np.ndarray] | Stream
    n_train: int
    val: Validation | Callable[[], Validation]  # fresh: drawn while training starts
    n_val: int
    held_out: Callable[[], tuple[LabelledImages, dict[str, list[int]]]]  # after fitting
    test: Callable[[LabelledImages, dict[str, list[int]]], tuple[list[bytes], list[str]]]
    augment: bool
    n_read: int
    frozen: EvalSet | None = None


@contextmanager
def prepared(
    client: MlflowClient,
    config: TrainConfig,
    settings: Settings,
    report: Progress,
    start: float | None = None,
) -> Iterator[Prepared]:
    """The data to fit on; the fresh path's generators run until the block ends. A fixed
    generated set is drawn in at most `config.draw_share` of the budget counted from `start`."""
    if config.data_dir is None and config.fresh and not config.include_feedback:
        alphabet = config.alphabet or synthetic.DIGITS_UPPER
        arch = geometry(config, None, config.length[1])
        report("starting the generators", 0.0, {})
        with fresh_data(config, arch, alphabet) as fresh:
            n_val, n_test = fresh.n_val, fresh.n_test
            splits = {
                "train": [],
                "val": list(range(n_val)),
                "test": list(range(n_val, n_val + n_test)),
            }
            yield Prepared(
                kind="synthetic",
                alphabet=alphabet,
                lengths=config.length,
                arch=arch,
                train=fresh.stream(math.ceil(fresh.capacity / config.batch_size)),
                n_train=fresh.capacity,
                val=fresh.validation,
                n_val=n_val,
                held_out=lambda: (fresh.held_out(config.seed), splits),
                test=lambda data, splits: (
                    [data.images[i] for i in splits["test"]],
                    [data.labels[i] for i in splits["test"]],
                ),
                augment=bool(config.augment),
                n_read=config.synthetic,
            )
        return
    deadline = None if start is None else start + config.draw_share * config.max_minutes * 60
    yield _prepare_fixed(client, config, settings, report, deadline)


def _prepare_fixed(
    client: MlflowClient,
    config: TrainConfig,
    settings: Settings,
    report: Progress,
    deadline: float | None,
) -> Prepared:
    """A folder, or one generated set drawn before training starts, split and preprocessed."""
    data = load_data(config, settings, report, deadline)
    frozen: EvalSet | None = None
    n_read = len(data)
    if config.data_dir is not None:
        frozen, data = _frozen_for_folder(client, config, settings, data, report)
    alphabet = config.alphabet or (
        synthetic.DIGITS_UPPER
        if config.data_dir is None
        else "".join(sorted(set(data.alphabet()) | set(frozen.alphabet() if frozen else "")))
    )
    if frozen is not None and set(frozen.alphabet()) - set(alphabet):
        raise DataError(
            f"the frozen evaluation set uses characters outside --alphabet {alphabet!r}; "
            "leave --alphabet out or train under another --model-name"
        )
    lengths = [len(label) for label in data.labels]
    arch = geometry(config, data, max(lengths))
    test_fraction = 0.0 if frozen is not None else config.test_fraction
    splits = split_indices(data.names, config.val_fraction, test_fraction)
    if not splits["train"] or not splits["val"] or (frozen is None and not splits["test"]):
        raise DataError(
            f"{len(data)} usable images are too few to split into train/val/test; add more images"
        )
    report("preprocessing", 0.0, {})
    x = {name: arrays(data, idx, arch) for name, idx in splits.items() if idx}
    labels = {name: [data.labels[i] for i in idx] for name, idx in splits.items()}
    y = {name: encode_labels(labels[name], alphabet, max(lengths)) for name in x}

    def test(data: LabelledImages, splits: dict[str, list[int]]) -> tuple[list[bytes], list[str]]:
        if frozen is not None:
            return frozen.images, frozen.labels
        return [data.images[i] for i in splits["test"]], labels["test"]

    return Prepared(
        kind="synthetic" if config.data_dir is None else "folder",
        alphabet=alphabet,
        lengths=(min(lengths), max(lengths)),
        arch=arch,
        train=(x["train"], y["train"]),
        n_train=len(splits["train"]),
        val=Validation(x["val"], y["val"], labels["val"], alphabet),
        n_val=len(splits["val"]),
        held_out=lambda: (data, splits),
        test=test,
        augment=config.augment if config.augment is not None else config.data_dir is not None,
        n_read=n_read,
        frozen=frozen,
    )
