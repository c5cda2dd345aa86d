"""Training's rules that decide what it keeps: checkpoint choice and input geometry."""

from __future__ import annotations

from pathlib import Path

from captchaops.data import standin
from captchaops.data.folder import read_folder
from captchaops.training.config import TrainConfig
from captchaops.training.loop import better as _better
from captchaops.training.tensors import geometry as _geometry


def test_checkpoints_move_on_the_blank_plateau_by_cer_then_loss() -> None:
    start = (-1.0, float("-inf"), float("-inf"))
    plateau = (0.0, -0.95, -21.0)
    assert _better(plateau, start)
    assert _better((0.0, -0.83, -23.0), plateau)  # CER fell: better, although loss rose
    assert _better((0.0, -0.95, -19.0), plateau)  # same CER, lower loss
    assert not _better((0.0, -0.95, -22.0), plateau)


def test_checkpoint_ties_go_to_the_later_epoch_once_something_is_read() -> None:
    read = (1.0, -0.0, -0.02)
    assert _better((1.0, -0.0, -0.05), read)  # higher loss, same accuracy and CER: later wins
    assert not _better((0.99, -0.0, -0.01), read)
    assert _better((1.0, -0.0, -0.01), (0.98, -0.004, -0.001))


def test_folder_geometry_follows_the_aspect_ratio_and_label_length(tmp_path: Path) -> None:
    standin.build(tmp_path, count=20, seed=1)
    data = read_folder(tmp_path)
    config = TrainConfig.folder()
    arch = _geometry(TrainConfig(data_dir=tmp_path, arch=config.arch), data, max_length=5)
    assert (arch.height, arch.width) == (32, 128)  # 200x50 is 4:1
    assert arch.time_steps >= 2 * 5 + 1
    long_labels = _geometry(TrainConfig(), None, max_length=30)  # synthetic, 30 characters
    assert long_labels.time_steps >= 2 * 30 + 1


def test_final_weights_stay_unless_a_checkpoint_beats_them_beyond_validation_noise() -> None:
    from captchaops.training.loop import holds_up

    final = {"val_seq_acc": 0.976, "val_cer": 0.006, "val_loss": 0.1}
    assert holds_up(final, (1.0, -0.0, -0.01), n_val=83)  # 2 images of 83: noise
    assert not holds_up(final, (1.0, -0.0, -0.01), n_val=3000)  # 72 images of 3000: real
    plateau = {"val_seq_acc": 0.0, "val_cer": 0.9, "val_loss": 20.0}
    assert not holds_up(plateau, (0.02, -0.5, -9.0), n_val=83)  # reads nothing: checkpoint
    assert holds_up(plateau, (0.0, -0.95, -21.0), n_val=83)  # plateau, lower CER: final


def test_batchnorm_statistics_are_recomputed_from_the_given_images_layer_after_layer() -> None:
    import keras
    import numpy as np

    from benchmarks.bench_folder_choice import recalibrate_batchnorm

    inner = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(name="second")])
    image = keras.Input((3,))
    first = keras.layers.BatchNormalization(name="first")
    model = keras.Model(image, inner(keras.layers.Dense(3, name="mix")(first(image))))
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(64, 3)) * [1.0, 2.0, 3.0] + [5.0, -1.0, 0.5]).astype("float32")
    recalibrate_batchnorm(model, x, chunk=16)  # 4 equal chunks: their running mean is exact
    np.testing.assert_allclose(first.moving_mean.numpy(), x.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(first.moving_variance.numpy(), x.var(axis=0), rtol=0.1)
    # the nested layer sees the first layer's output normalised with the new statistics
    mixed = model.get_layer("mix")(first(x, training=False)).numpy()
    second = inner.get_layer("second")
    np.testing.assert_allclose(second.moving_mean.numpy(), mixed.mean(axis=0), atol=0.05)
    assert first.momentum == second.momentum == 0.99  # restored
