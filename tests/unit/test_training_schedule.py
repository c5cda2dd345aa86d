"""The schedule in steps: a complete warm-up + cosine over as many steps as the budget holds."""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest

from captchaops.training.schedule import StepPlan, WarmupCosine


class Clock:
    """A clock each step moves on by `per_step` seconds."""

    def __init__(self, per_step: float) -> None:
        self.now, self.per_step = 1000.0, per_step

    def __call__(self) -> float:
        return self.now


def lr(schedule: WarmupCosine, step: int) -> float:
    return float(keras.ops.convert_to_numpy(schedule(step)))


def run(plan: StepPlan, clock: Clock, steps: int | None = None) -> None:
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.stop_training = False
    plan.set_model(model)
    for _ in range(steps or 10**6):
        clock.now += clock.per_step
        plan.on_train_batch_end(plan.step)  # one epoch: the step's index within it
        if model.stop_training:
            return


def test_the_schedule_warms_up_then_decays_to_its_floor_over_the_planned_steps() -> None:
    schedule = WarmupCosine(peak=1e-3, warmup_fraction=0.1, total_steps=1000)
    assert lr(schedule, 0) == pytest.approx(1e-6)  # the floor, 1/1000 of the peak
    assert lr(schedule, 50) == pytest.approx(0.5e-3)
    assert lr(schedule, 100) == pytest.approx(1e-3)
    assert lr(schedule, 550) == pytest.approx(0.5e-3, rel=1e-3)
    assert lr(schedule, 1000) == pytest.approx(1e-6)
    schedule.total.assign(500.0)  # a slower machine: the same curve over fewer steps
    assert lr(schedule, 50) == pytest.approx(1e-3)
    assert lr(schedule, 275) == pytest.approx(0.5e-3, rel=1e-3)
    assert lr(schedule, 500) == pytest.approx(1e-6)


def test_a_new_plan_runs_the_rest_of_the_curve_without_a_jump_in_the_learning_rate() -> None:
    """A plan corrected upwards after slow first steps must not raise the learning rate again
    half-way through (the fill path's runs read 81-84% while it did, docs/training.md)."""
    schedule = WarmupCosine(peak=1e-3, warmup_fraction=0.05, total_steps=2400)
    rates = [lr(schedule, step) for step in range(0, 750, 10)]
    schedule.replan(750, 4600)  # the machine turned out faster: more steps, same curve
    rates += [lr(schedule, step) for step in range(750, 4601, 10)]
    past_peak = rates[rates.index(max(rates)) :]
    assert all(b <= a * (1 + 1e-5) for a, b in itertools.pairwise(past_peak))
    assert lr(schedule, 750) == pytest.approx(rates[74], rel=0.01)
    assert lr(schedule, 4600) == pytest.approx(1e-6)  # the floor at the new end
    middle = lr(schedule, 750 + (4600 - 750) // 2)
    assert lr(schedule, 750) > middle > 1e-6
    schedule.replan(3000, 3200)  # slower after all: the rest of the curve in 200 steps
    assert lr(schedule, 3000) == pytest.approx(rates[(3000 - 750) // 10 + 75], rel=0.01)
    assert lr(schedule, 3200) == pytest.approx(1e-6)
    assert float(keras.ops.convert_to_numpy(schedule.total)) == 3200


def test_a_slower_machine_plans_fewer_steps_and_finishes_them_before_the_deadline() -> None:
    planned = {}
    for per_step in (0.05, 0.1):
        clock = Clock(per_step)
        schedule = WarmupCosine(1e-3, 0.05, 30_000)
        plan = StepPlan(schedule, 30_000, deadline=clock.now + 100.0, clock=clock)
        run(plan, clock)
        assert plan.step == plan.planned < 30_000  # stopped by its plan, not by the deadline
        assert clock.now <= 1000.0 + 100.0
        assert float(keras.ops.convert_to_numpy(schedule.total)) == plan.planned
        assert plan.step_seconds == pytest.approx(per_step)
        planned[per_step] = plan.planned
    assert planned[0.05] == pytest.approx(2 * planned[0.1], rel=0.02)
    assert planned[0.05] == pytest.approx(100 / 0.05, rel=0.02)


def test_the_plan_follows_a_machine_that_slows_down_and_never_exceeds_the_most() -> None:
    clock = Clock(0.05)
    schedule = WarmupCosine(1e-3, 0.05, 30_000)
    plan = StepPlan(schedule, 30_000, deadline=clock.now + 100.0, clock=clock)
    run(plan, clock, steps=400)
    first = plan.planned
    clock.per_step = 0.2  # another process arrives
    run(plan, clock, steps=200)
    plan.on_epoch_end(0)
    assert plan.planned < first
    few = StepPlan(WarmupCosine(1e-3, 0.05, 16), 16, deadline=clock.now + 100.0, clock=clock)
    run(few, clock)
    assert few.step == few.planned == 16  # a short run: the steps it asked for, all of them


def test_steps_slowed_by_a_pool_being_drawn_are_not_what_the_plan_is_made_from() -> None:
    """The fill path's first steps share the cores with the workers drawing its pool; a plan
    timed on them would be half as long as the steps the rest of the budget holds."""
    plans = {}
    for settle in (10, 400):
        clock = Clock(0.2)  # the pool is being drawn...
        plan = StepPlan(WarmupCosine(1e-3, 0.05, 30_000), 30_000, clock.now + 200.0,
                        settle=settle, clock=clock)  # fmt: skip
        run(plan, clock, steps=400)
        clock.per_step = 0.05  # ...and it is in
        run(plan, clock, steps=200)
        plans[settle] = plan.planned
    assert plans[400] == pytest.approx(560 + (200 - 88) / 0.05, rel=0.01)  # timed from step 400
    assert plans[10] < 0.5 * plans[400]


def test_the_compiled_step_reads_the_planned_length() -> None:
    """The optimiser's learning rate follows `total` inside fit, without a per-step callback."""
    schedule = WarmupCosine(1e-2, 0.0, 1000)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss="mse")
    x, y = np.ones((8, 1), "float32"), np.zeros((8, 1), "float32")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)  # steps 0 and 1, traced once
    moved = model.get_weights()
    schedule.total.assign(2.0)  # step 2 is now past the end: the floor, 1/1000 of the peak
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    after = model.get_weights()
    step = [np.abs(a - b).max() for a, b in zip(after, moved, strict=True)]
    model2 = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model2.set_weights(moved)
    model2.compile(optimizer=keras.optimizers.SGD(1e-2), loss="mse")
    model2.fit(x, y, batch_size=8, epochs=1, verbose=0)
    full = [np.abs(a - b).max() for a, b in zip(model2.get_weights(), moved, strict=True)]
    assert max(step) == pytest.approx(max(full) / 1000, rel=0.05)


def test_steps_run_several_to_a_call_are_each_counted_and_stop_the_plan_within_a_call() -> None:
    """`steps_per_execution` (the GPU preset's one host sync per 32 steps) calls the callback
    once per call, with the index of the call's last step: the plan still counts steps."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse", steps_per_execution=4)
    x, y = np.ones((80, 1), "float32"), np.zeros((80, 1), "float32")  # 10 steps an epoch
    plan = StepPlan(WarmupCosine(1e-3, 0.05, 1000), 1000, deadline=float("inf"))
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[plan], verbose=0)
    assert plan.step == 20 == int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    short = StepPlan(WarmupCosine(1e-3, 0.05, 13), 13, deadline=float("inf"))
    model.fit(x, y, batch_size=8, epochs=5, callbacks=[short], verbose=0)
    assert short.step == 14  # the epoch's last call (steps 9-10) of the second epoch: 13 reached


def test_the_compiled_training_step_skips_grapplers_graph_rewrites_on_tensorflow() -> None:
    """They cost the demo 2 s before its first step and no step speed (docs/training.md)."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("a TensorFlow setting")
    import tensorflow as tf

    from captchaops.model.crnn import Architecture
    from captchaops.training.loop import compiled_crnn
    from harness.training import tiny_config

    arch = Architecture(height=24, width=72, filters=(8, 8, 8, 8), rnn_units=8)
    compiled_crnn(tiny_config(), arch, 5, augment=False, total_steps=10, deadline=1e12)
    assert tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer") is True
