"""schedule: the learning rate of each step, warm-up then constant, linear or cosine."""

import pytest

from gpt2_iree.schedule import check, learning_rate


def rates(schedule, steps=10, warmup=0, peak=1.0):
    return [learning_rate(step, steps, peak, schedule, warmup) for step in range(steps)]


def test_warmup_rises_linearly_to_the_peak():
    assert rates("constant", warmup=4)[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_constant_is_the_peak_throughout():
    assert rates("constant", peak=0.1) == [0.1] * 10


def test_linear_decays_from_the_peak_towards_zero_over_the_run():
    assert rates("linear", steps=5) == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert rates("linear", steps=6, warmup=2) == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])


def test_cosine_starts_at_the_peak_and_halves_midway():
    values = rates("cosine", steps=10)
    assert values[0] == 1.0 and values[5] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(values, values[1:])) and values[-1] > 0


@pytest.mark.parametrize("schedule, warmup, steps, message", [
    ("step", 0, 10, "--lr-schedule 'step' is invalid; valid: constant, linear, cosine"),
    ("cosine", 10, 10, "--warmup-steps 10 is out of range for a run of 10 steps; valid: 0 to 9"),
])
def test_a_schedule_that_cannot_run_is_refused(schedule, warmup, steps, message):
    with pytest.raises(ValueError, match=message):
        check(schedule, warmup, steps)
