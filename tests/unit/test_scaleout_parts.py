"""The pieces of scale-out that need no running Ray: folds, the interval, the address, the search
space (the data set's shards: test_shards.py)."""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from captchaops.data.dataset import DataError
from captchaops.model.reader import VOTE, combine_members
from captchaops.scaleout import ScaleoutError
from captchaops.scaleout.board import Board
from captchaops.scaleout.cv import combined, cross_validate, fold_of, t_interval
from captchaops.scaleout.engine import Engine, _reachable, need_gpus, parallel_runs, private_token
from captchaops.scaleout.preflight import judge, refuse_loopback
from captchaops.scaleout.tune import (
    MIN_TRIAL_SECONDS,
    PUBLISH_SECONDS,
    TRIAL_START_SECONDS,
    plan_budget,
)
from captchaops.scaleout.work import Job, Outcome, seconds_allowed
from captchaops.settings import Settings
from captchaops.training import TrainError
from captchaops.training.config import TrainConfig, from_options


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


def test_addresses_ray_resolves_itself_pass_and_a_malformed_one_names_the_forms() -> None:
    assert _reachable("vertex_ray://projects/p/locations/us-central1/persistentResources/r") is None
    assert _reachable("auto") is None
    with pytest.raises(ScaleoutError, match=r"ray://HOST:10001 from outside it, vertex_ray://"):
        _reachable("head-without-port")


def test_a_search_budget_shares_what_is_left_between_its_rounds() -> None:
    # 2 trials side by side, 3 minutes, 20 s of start-up used: one round, all of the rest.
    budget = plan_budget(3, 2, 2, 9.5, started=1000.0, now=1020.0)
    assert (budget.trials, budget.rounds) == (2, 1)
    assert budget.ends_by == 1000.0 + 180 - PUBLISH_SECONDS
    assert budget.trial_seconds == pytest.approx(180 - 20 - PUBLISH_SECONDS)
    assert budget.trial_seconds < 9.5 * 60  # not each trial's own 9.5 minutes
    # 4 trials on one slot: four rounds share it; each trial still ends by `ends_by`.
    four = plan_budget(10, 4, 1, 9.5, started=0.0, now=0.0)
    assert four.rounds == 4 and four.trial_seconds * 4 <= 600 - PUBLISH_SECONDS
    # Without --minutes each trial keeps its preset's budget.
    assert plan_budget(None, 4, 2, 9.5, started=0.0, now=50.0).trial_seconds == 9.5 * 60


def test_a_short_budget_runs_the_rounds_that_fit_and_none_is_one_line() -> None:
    slot = TRIAL_START_SECONDS + MIN_TRIAL_SECONDS
    budget = plan_budget(3, 16, 2, 9.5, started=0.0, now=0.0)
    assert (
        budget.rounds == int((180 - PUBLISH_SECONDS) // slot) and budget.trials == budget.rounds * 2
    )
    assert budget.trial_seconds >= slot
    with pytest.raises(ScaleoutError, match=r"--minutes 1 leaves 0 s for trials.*--minutes 2"):
        plan_budget(1, 2, 2, 9.5, started=0.0, now=40.0)


def test_a_trial_never_runs_past_its_searchs_end() -> None:
    job = replace(_job(), config=replace(TrainConfig.folder(), max_minutes=9.5))
    assert seconds_allowed(job, now=0.0) == 9.5 * 60
    assert seconds_allowed(replace(job, ends_by=100.0), now=40.0) == 60.0
    assert seconds_allowed(replace(job, ends_by=100.0), now=140.0) == 0.0


def _job() -> Job:
    from captchaops.model.crnn import Architecture

    return Job(
        "t", TrainConfig.folder(), Architecture(), "ab", 4, False, "http://h:1", "r", "p", (), ()
    )


MINE = {"python": "3.11.7", "ray": "2.60.0", "captchaops": "0.1.0"}


def test_the_cluster_check_names_a_version_mismatch_first_with_both_versions() -> None:
    found = MINE | {"ray": "2.59.1", "node": "10.0.0.7", "unreachable": "ConnectError"}
    line = judge(found, MINE, "http://tracking:8000")
    assert line is not None and "\n" not in line
    assert "the worker at 10.0.0.7 runs Python 3.11.7, Ray 2.59.1" in line
    assert "this machine runs Python 3.11.7, Ray 2.60.0, captchaops 0.1.0" in line
    # Ray's own rule for Python: the same 3.X; a different patch release works.
    assert judge(MINE | {"python": "3.11.9"}, MINE, "http://tracking:8000") is None
    assert "Python 3.12.1" in (judge(MINE | {"python": "3.12.1"}, MINE, "http://t:1") or "")


def test_rays_workers_run_without_kerass_extras_even_where_captchaops_is_missing() -> None:
    """The workers' setup hook travels by value (it runs on a worker of another image too),
    and there the extras Keras would import when installed are not."""
    import subprocess
    import sys

    from ray import cloudpickle

    from captchaops.scaleout.engine import KERAS_EXTRAS, lean_worker

    worker = (
        "import pickle, sys\n"
        "sys.modules['captchaops'] = None  # a worker without captchaops\n"
        "pickle.loads(sys.stdin.buffer.read())()\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ImportError:\n"
        "        print('absent', name)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", worker, *KERAS_EXTRAS, "json"],
        input=cloudpickle.dumps(lean_worker()),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().split("\n")[:-1] == [f"absent {name}" for name in KERAS_EXTRAS]


def test_a_loopback_tracking_server_is_refused_before_joining_a_cluster_that_is_elsewhere() -> None:
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: nothing is sent to it, a socket
    # only fails to bind there.
    with pytest.raises(ScaleoutError, match="this machine's loopback, which the Ray cluster at"):
        refuse_loopback("http://rita:s3cret@127.0.0.1:8000", "ray://192.0.2.1:10001")
    with pytest.raises(ScaleoutError, match="CAPTCHAOPS_TRACKING_URI") as refused:
        refuse_loopback("http://localhost:8000", "vertex_ray://projects/p/locations/l/r/x")
    assert "s3cret" not in str(refused.value)
    refuse_loopback("http://127.0.0.1:8000", "ray://127.0.0.1:10001")  # a head on this machine
    # A head joined by its GCS address: this machine is a node and may run the work itself,
    # so only the workers' own check can tell.
    refuse_loopback("http://127.0.0.1:8000", "192.0.2.1:6379")
    refuse_loopback("http://10.0.0.4:8000", "ray://192.0.2.1:10001")  # routable: the check's


def test_the_cluster_check_explains_loopback_and_never_shows_credentials() -> None:
    found = MINE | {"node": "10.0.0.7", "unreachable": "ConnectError: [Errno 111] refused"}
    line = judge(found, MINE, "http://rita:s3cret@127.0.0.1:8000") or ""
    assert "cannot reach the tracking server at http://127.0.0.1:8000" in line
    assert "the worker's own loopback" in line and "CAPTCHAOPS_TRACKING_URI" in line
    assert "s3cret" not in line and "rita" not in line
    refused = judge(MINE | {"refused": "PERMISSION_DENIED"}, MINE, "https://t.example") or ""
    assert "needs edit rights" in refused and "editor" in refused
    assert judge(MINE | {"node": "10.0.0.7"}, MINE, "https://t.example") is None


def test_a_local_rays_token_is_0600_in_a_0700_folder_of_the_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):  # restored after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    token = private_token(tmp_path)
    assert token == tmp_path / "ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    assert len(token.read_text()) == 64 and os.environ["RAY_AUTH_TOKEN_PATH"] == str(token)
    first = token.read_text()
    token.chmod(0o644)  # one left readable (by hand, an older version) is made private again
    assert private_token(tmp_path) == token and token.read_text() == first
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    # A token the caller chose is left alone.
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/elsewhere/token")
    assert private_token(tmp_path / "other") is None and not (tmp_path / "other").exists()


def test_a_search_with_nothing_to_register_says_why_in_one_line() -> None:
    from captchaops.scaleout.tune import Budget, ChildRuns, why_none

    nobody: Any = None  # why_none reads no run
    children = ChildRuns(nobody, "0", "parent", Board("t"), lambda: None, "ada")
    budget = Budget(2, 100.0, 1000.0, 1)
    children.runs = {"a": "r1", "b": "r2"}
    children.failures = ["trial a: failed twice (see the Ray logs)"] * 2
    assert why_none(children, budget, 3) == (
        "every trial failed (trial a: failed twice (see the Ray logs)); nothing registered"
    )
    children.failures = []
    line = why_none(children, budget, 3)
    assert "inside --minutes 3 (2 trials in 1 round, each at most 100 s)" in line
    assert "\n" not in line and "more minutes or fewer trials" in line


def test_a_run_asking_more_gpus_than_any_node_has_is_refused_in_one_line() -> None:
    # Two GPU nodes of one GPU each: a 1-GPU run fits, a 2-GPU run fits on no node.
    cluster = Engine("10.0.0.2:6379", cpus=8.0, dashboard_url=None, gpus=2.0, node_gpus=1.0)
    need_gpus(cluster, 0.0)
    need_gpus(cluster, 1.0)
    need_gpus(cluster, 0.5)
    with pytest.raises(ScaleoutError) as refused:
        need_gpus(cluster, 2.0)
    line = str(refused.value)
    assert "\n" not in line and "--gpus-per-trial 2 " in line
    assert "the Ray cluster at 10.0.0.2:6379" in line and "the most on one node is 1" in line
    assert "raise the gpu-trainers group's minReplicas" in line
    local = Engine(None, cpus=2.0, dashboard_url=None)
    with pytest.raises(ScaleoutError, match=r"this machine's Ray offers \(it has none\)"):
        need_gpus(local, 1.0)


def test_runs_side_by_side_are_bounded_by_cpus_and_by_gpus() -> None:
    engine = Engine("h:6379", cpus=8.0, dashboard_url=None, gpus=2.0, node_gpus=1.0)
    assert parallel_runs(engine, 2.0, 0.0) == 4
    assert parallel_runs(engine, 2.0, 1.0) == 2
    assert parallel_runs(engine, 2.0, 0.5) == 4
    assert parallel_runs(Engine(None, cpus=1.0, dashboard_url=None), 2.0, 0.0) == 1


def test_train_cv_tune_and_members_resolve_options_to_one_config() -> None:
    assert from_options(None, "imgs") == replace(TrainConfig.folder(), data_dir=Path("imgs"))
    assert from_options(None, None) == TrainConfig.demo()
    assert from_options("gpu", "imgs").batch_size == TrainConfig.gpu().batch_size
    assert from_options("accuracy", None, seed=None) == TrainConfig.accuracy()
    resolved = from_options(None, None, synthetic=500, max_steps=40, seed=3)
    assert resolved == replace(TrainConfig.demo(), synthetic=500, max_steps=40, seed=3)
    with pytest.raises(TrainError, match="--preset 'huge' is not a preset; use one of demo, "):
        from_options("huge", None)


def test_runs_are_credited_to_the_tracking_account_else_the_drivers_login(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from captchaops.scaleout.runner import who_ran

    for name in ("LOGNAME", "USER", "LNAME", "USERNAME", "CAPTCHAOPS_TRACKING_USERNAME"):
        monkeypatch.delenv(name, raising=False)
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials
    monkeypatch.setenv("LOGNAME", "grace")
    assert who_ran(Settings(home=tmp_path)) == "grace"
    # MLflow's own login (a pod's Secret as MLFLOW_TRACKING_*), then the settings' account.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ed")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    assert who_ran(Settings(home=tmp_path)) == "ed"
    assert who_ran(Settings(home=tmp_path, tracking_username="ada")) == "ada"


def test_gpus_per_trial_without_rays_runs_is_refused_in_one_line() -> None:
    from typer.testing import CliRunner

    from captchaops.cli import app

    done = CliRunner().invoke(app, ["train", "--synthetic", "300", "--gpus-per-trial", "1"])
    assert done.exit_code == 1
    assert "--gpus-per-trial is for Ray's runs: add --members K" in done.output
    assert "Traceback" not in done.output


class _FlakyHead:
    """Ray's `init`/`shutdown` as a busy head answers them: `failures` transient errors first."""

    def __init__(self, failures: int, message: str) -> None:
        self.failures, self.message, self.calls, self.shutdowns = failures, message, 0, 0

    def init(self, address: str, **options: object) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(self.message)
        return f"joined {address}"

    def shutdown(self) -> None:
        self.shutdowns += 1


CLIENT_SERVER_FAILED = (
    "Initialization failure from server:\nRuntimeError: Starting Ray client server failed. "
    "See ray_client_server_23000.err for detailed logs."
)


def test_a_head_that_fails_to_start_its_client_server_is_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from captchaops.scaleout import engine

    monkeypatch.setattr(engine.time, "sleep", lambda s: None)
    head = _FlakyHead(2, CLIENT_SERVER_FAILED)
    assert engine._join(head, "ray://10.0.0.2:10001", {}) == "joined ray://10.0.0.2:10001"
    assert (head.calls, head.shutdowns) == (3, 2)
    # Every try failing, or another error, or a GCS address: the error goes to the user.
    with pytest.raises(ConnectionError):
        engine._join(_FlakyHead(3, CLIENT_SERVER_FAILED), "ray://10.0.0.2:10001", {})
    refused = _FlakyHead(1, "connection refused")
    with pytest.raises(ConnectionError):
        engine._join(refused, "ray://10.0.0.2:10001", {})
    assert refused.calls == 1
    gcs = _FlakyHead(1, CLIENT_SERVER_FAILED)
    with pytest.raises(ConnectionError):
        engine._join(gcs, "10.0.0.2:6379", {})
    assert gcs.calls == 1
