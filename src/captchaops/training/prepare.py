"""Training's first stage: the data a config asks for, split, preprocessed or streamed.

`prepared` yields what `training.run.train` fits on and publishes, as data: the fixed path's
arrays (a folder with its frozen set held out, or one generated set) with its held-out and test
images, or the fresh path's stream and its generators, which stay up until the `with` block
ends and draw its held-out sets while it fits. It reads the tracking server only for the frozen
set, through the client it is given. `split_fixed` is the fixed path's hold-out and split
alone, which `tune` and `train --members` use too before their runs go to Ray.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

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
from captchaops.stack.promotions_client import ServiceError, pin_evalset
from captchaops.training import TrainError
from captchaops.training.config import TrainConfig
from captchaops.training.fresh import FreshData, fresh_data
from captchaops.training.loop import Progress, Stream, Validation
from captchaops.training.tensors import arrays, geometry


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
        pin_evalset(settings, frozen)  # by the promotion service, where one signs
    except (EvalSetError, ServiceError) as exc:
        raise TrainError(str(exc)) from exc
    keep = frozen.unseen(data.images)
    return frozen, data.subset(keep)


@dataclass(frozen=True)
class FixedSplit:
    """A folder or one generated set as `train` splits it, not yet preprocessed: a folder's
    frozen set held out, the rest split into train/val(/test) by image name."""

    data: LabelledImages  # the images left to train on (a folder's frozen set held out)
    frozen: EvalSet | None
    alphabet: str
    arch: Architecture
    splits: dict[str, list[int]]  # indices into `data` per split
    n_read: int  # images read or generated, the frozen set's included


def split_fixed(
    client: MlflowClient,
    config: TrainConfig,
    settings: Settings,
    report: Progress,
    deadline: float | None = None,
) -> FixedSplit:
    """The fixed path's data held out and split, as `train` splits it (a generated set drawn
    until `deadline` at the latest); a one-line DataError when too few images are left."""
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
    arch = geometry(config, data, max(len(label) for label in data.labels))
    test_fraction = 0.0 if frozen is not None else config.test_fraction
    splits = split_indices(data.names, config.val_fraction, test_fraction)
    if not splits["train"] or not splits["val"] or (frozen is None and not splits["test"]):
        raise DataError(
            f"{len(data)} usable images are too few to split into train/val/test; add more images"
        )
    return FixedSplit(data, frozen, alphabet, arch, splits, n_read)


@dataclass(frozen=True)
class HeldOut:
    """The run's data set as it is logged, and the images its version is tested on."""

    data: LabelledImages  # what the run logs as its data set (fresh path: its held-out sets)
    splits: dict[str, list[int]]  # indices into `data` per split
    test_images: list[bytes]  # the frozen set's images for a folder, else the test split's
    test_labels: list[str]
    digest: str  # `data.digest()`


@dataclass(frozen=True)
class Prepared:
    """What `fit` fits on and `publish` logs: the fixed path's arrays or the fresh path's stream.

    Data only, computed here; on the fresh path the validation and held-out sets are still being
    drawn, so they are None here and come from the running generators (`Preparation`)."""

    kind: str
    alphabet: str
    lengths: tuple[int, int]
    arch: Architecture
    train: tuple[np.ndarray, np.ndarray] | Stream
    n_train: int
    val: Validation | None  # None on the fresh path: drawn beside the first steps
    n_val: int
    augment: bool
    n_read: int
    held_out: HeldOut | None  # None on the fresh path: drawn while fitting (`Preparation`)
    frozen: EvalSet | None = None


@dataclass(frozen=True)
class Preparation:
    """The prepared data, and on the fresh path the generators still drawing its held-out sets.

    The fresh path's validation and test sets are what it cannot compute before fitting: they
    are drawn on the generators' workers beside the first training steps, so the first step
    does not wait for them. The loop waits for the validation set at its first epoch's end
    (`val`); the caller collects both as data once fitting is over (`held_out`)."""

    prepared: Prepared
    fresh: FreshData | None = None
    seed: int = 0

    @property
    def val(self) -> Validation | Callable[[], Validation]:
        """The validation set for `fit`: in hand on the fixed path, else the generators' (the
        loop waits for it once, at its first epoch's end)."""
        if self.prepared.val is not None:
            return self.prepared.val
        assert self.fresh is not None, "a fresh Preparation carries its generators"
        return self.fresh.validation

    def held_out(self) -> HeldOut:
        """The held-out data: computed already on the fixed path; on the fresh path the sets
        drawn while fitting, waited for here (the training batches end first)."""
        if self.prepared.held_out is not None:
            return self.prepared.held_out
        assert self.fresh is not None, "a fresh Preparation carries its generators"
        data = self.fresh.held_out(self.seed)
        n_val, n_test = self.fresh.n_val, self.fresh.n_test
        splits = {
            "train": [],
            "val": list(range(n_val)),
            "test": list(range(n_val, n_val + n_test)),
        }
        test = splits["test"]
        return HeldOut(
            data,
            splits,
            [data.images[i] for i in test],
            [data.labels[i] for i in test],
            data.digest(),
        )


@contextmanager
def prepared(
    client: MlflowClient,
    config: TrainConfig,
    settings: Settings,
    report: Progress,
    start: float | None = None,
) -> Iterator[Preparation]:
    """The data to fit on; the fresh path's generators run until the block ends. A fixed
    generated set is drawn in at most `config.draw_share` of the budget counted from `start`."""
    if config.data_dir is None and config.fresh and not config.include_feedback:
        alphabet = config.alphabet or synthetic.DIGITS_UPPER
        arch = geometry(config, None, config.length[1])
        report("starting the generators", 0.0, {})
        with fresh_data(config, arch, alphabet) as fresh:
            data = Prepared(
                kind="synthetic",
                alphabet=alphabet,
                lengths=config.length,
                arch=arch,
                train=fresh.stream(math.ceil(fresh.capacity / config.batch_size)),
                n_train=fresh.capacity,
                val=None,
                n_val=fresh.n_val,
                augment=bool(config.augment),
                n_read=config.synthetic,
                held_out=None,
            )
            yield Preparation(data, fresh, config.seed)
        return
    deadline = None if start is None else start + config.draw_share * config.max_minutes * 60
    yield Preparation(_prepare_fixed(client, config, settings, report, deadline))


def _prepare_fixed(
    client: MlflowClient,
    config: TrainConfig,
    settings: Settings,
    report: Progress,
    deadline: float | None,
) -> Prepared:
    """A folder, or one generated set drawn before training starts, split and preprocessed."""
    split = split_fixed(client, config, settings, report, deadline)
    data, alphabet, arch, splits = split.data, split.alphabet, split.arch, split.splits
    frozen = split.frozen
    lengths = [len(label) for label in data.labels]
    report("preprocessing", 0.0, {})
    x = {name: arrays(data, idx, arch) for name, idx in splits.items() if idx}
    labels = {name: [data.labels[i] for i in idx] for name, idx in splits.items()}
    y = {name: encode_labels(labels[name], alphabet, max(lengths)) for name in x}
    logged = replace(data, arrays=None)  # the generator's arrays are in `x` now
    if frozen is not None:
        test_images, test_labels = frozen.images, frozen.labels
    else:
        test_images, test_labels = [data.images[i] for i in splits["test"]], labels["test"]
    return Prepared(
        kind="synthetic" if config.data_dir is None else "folder",
        alphabet=alphabet,
        lengths=(min(lengths), max(lengths)),
        arch=arch,
        train=(x["train"], y["train"]),
        n_train=len(splits["train"]),
        val=Validation(x["val"], y["val"], labels["val"], alphabet),
        n_val=len(splits["val"]),
        augment=config.augment if config.augment is not None else config.data_dir is not None,
        n_read=split.n_read,
        held_out=HeldOut(logged, splits, test_images, test_labels, logged.digest()),
        frozen=frozen,
    )
