"""The pieces of scale-out that need no running Ray: folds, the interval, the data set's zip, the
address, the search space."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from captchaops.data.dataset import DataError, LabelledImages
from captchaops.model.reader import VOTE, combine_members
from captchaops.scaleout import ScaleoutError
from captchaops.scaleout.board import Board
from captchaops.scaleout.cv import combined, cross_validate, fold_of, t_interval
from captchaops.scaleout.engine import _reachable
from captchaops.scaleout.shipping import pack, unpack
from captchaops.scaleout.work import Outcome
from captchaops.settings import Settings
from captchaops.training.config import TrainConfig


def test_folds_are_decided_by_name_and_cover_every_fold() -> None:
    names = [f"img{i}.png" for i in range(200)]
    folds = [fold_of(n, 5) for n in names]
    assert folds == [fold_of(n, 5) for n in names]
    assert set(folds) == set(range(5))


def test_t_interval_widens_with_spread_and_needs_two_folds() -> None:
    assert t_interval([0.9]) is None
    low, high = t_interval([0.9, 0.95, 1.0, 0.97, 0.93]) or (0, 0)
    assert low < 0.95 < high <= 1.0
    narrow = t_interval([0.95, 0.951, 0.949, 0.95, 0.95]) or (0, 0)
    assert narrow[1] - narrow[0] < high - low


def test_the_data_set_zip_round_trips_and_is_named_by_digest(tmp_path: Path) -> None:
    data = LabelledImages([b"\x89PNG a", b"\x89PNG b"], ["ab", "cd"], ["ab.png", "cd.png"], "f")
    path = pack(data, tmp_path)
    assert path.name == f"{data.digest()}.zip"
    back = unpack(path)
    assert (back.images, back.labels, back.names) == (data.images, data.labels, data.names)
    assert back.digest() == data.digest()


def test_a_cluster_address_nobody_answers_is_one_line_with_the_fix() -> None:
    with pytest.raises(ScaleoutError, match="ray start --head"):
        _reachable("127.0.0.1:1", timeout=2)
    with pytest.raises(ScaleoutError, match="HOST:PORT"):
        _reachable("nonsense")


def test_members_combine_by_the_most_confident_answer_or_a_weighted_vote() -> None:
    a = [("3ny45", 0.9), ("44pe", 0.4), ("b4y5x", 0.5)]
    b = [("3n45", 0.6), ("44ype", 0.7), ("b45x", 0.3)]
    c = [("3n45", 0.5), ("44ype", 0.2), ("b4y5x", 0.4)]
    assert combine_members([a]) == a
    assert combine_members([a, b]) == [("3ny45", 0.9), ("44ype", 0.7), ("b4y5x", 0.5)]
    voted = combine_members([a, b, c], VOTE)
    assert [t for t, _ in voted] == ["3n45", "44ype", "b4y5x"]
    assert voted[0][1] == pytest.approx((0.6 + 0.5) / 3)


def member(name: str, val: list[tuple[str, float]], test: list[tuple[str, float]]) -> Outcome:
    steps = {"best_val_cer": 0.1, "wall_seconds": 60.0, "steps_run": 100.0}
    return Outcome(name, steps, predictions=test, val_predictions=val)


def test_a_folds_members_answer_by_the_rule_that_reads_more_of_its_validation_images() -> None:
    """`cv --members`: the rule is chosen on the fold's validation images, then it alone
    answers the held-out ones (here the vote wins validation but would lose the test)."""
    val_labels = ["ab", "cd"]
    members = [
        member("fold 1 member 1", [("ab", 0.9), ("cx", 0.9)], [("zz", 0.5), ("ef", 0.2)]),
        member("fold 1 member 2", [("ax", 0.5), ("cd", 0.5)], [("gh", 0.45), ("ef", 0.4)]),
        member("fold 1 member 3", [("ab", 0.1), ("cd", 0.5)], [("gh", 0.3), ("ef", 0.3)]),
    ]
    metrics, rule, val = combined(members, val_labels, ["gh", "ef"])
    assert val == {"max_confidence": 0.5, "vote": 1.0} and rule == VOTE
    # The vote answers "gh" (0.45 + 0.3) over "zz" (0.5); the most confident member would not.
    assert metrics["test_seq_acc"] == 1.0
    assert metrics["steps_run"] == 300.0 and metrics["wall_seconds"] == 60.0
    tied = [member(m.name, [("ab", 0.5), ("cd", 0.5)], m.predictions) for m in members]
    _, rule, _ = combined(tied, val_labels, ["gh", "ef"])
    assert rule == "max_confidence"  # a tie on validation keeps the most confident member


def test_cv_refuses_a_member_count_out_of_range_before_reading_anything(tmp_path: Path) -> None:
    config = replace(TrainConfig.folder(), data_dir=tmp_path / "absent")
    for bad in (0, 17):
        with pytest.raises(DataError, match=f"--members {bad} is out of range"):
            cross_validate(config, Settings(), 5, None, Board("cv"), members=bad)


def test_the_preset_is_a_point_of_its_own_search_space_and_a_trial_reads_back() -> None:
    from ray.tune.search.sample import Categorical, Float

    from captchaops.model.crnn import Architecture
    from captchaops.scaleout.tune import preset_point, search_space, with_trial
    from captchaops.training.config import TrainConfig

    for base in (TrainConfig.folder(), TrainConfig.demo()):
        space, point = search_space(base), preset_point(base)
        assert set(space) == set(point)
        for name, domain in space.items():
            if isinstance(domain, Categorical):
                assert point[name] in domain.categories, name
            else:
                assert isinstance(domain, Float)
                assert domain.lower <= point[name] <= domain.upper, name
    # Applying the preset's own point changes nothing that trains.
    base = TrainConfig.folder()
    same = with_trial(base, base.arch, preset_point(base))
    assert same.arch == base.arch and same.learning_rate == base.learning_rate
    assert same.max_steps == base.max_steps and same.ema_momentum == base.ema_momentum
    wider = with_trial(base, Architecture(), preset_point(base) | {"conv_scale": 1.5})
    assert wider.arch.filters == tuple(round(f * 1.5) for f in Architecture().filters)


def test_trials_tied_on_validation_cer_are_ranked_by_validation_loss() -> None:
    from captchaops.scaleout.tune import rank

    done = [
        {"trial_id": "a", "val_cer": 0.0, "val_loss": 0.31},
        {"trial_id": "b", "val_cer": 0.0, "val_loss": 0.02},
        {"trial_id": "c", "val_cer": 0.01, "val_loss": 0.001},
        {"trial_id": "d", "val_cer": 0.0},  # a result without a loss ranks last among its ties
    ]
    assert [m["trial_id"] for m in sorted(done, key=rank)] == ["b", "a", "d", "c"]
