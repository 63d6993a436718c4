"""The demo recipe's warm-up x cosine learning-rate factor (train/schedule.py)."""

from __future__ import annotations

import math

import pytest

from minicpmv.train.schedule import warm_cosine


@pytest.mark.parametrize("warm, total", [(1, 1), (250, 5000), (4, 40), (1, 6000)])
def test_warm_cosine_is_the_warm_up_times_the_cosine_over_the_whole_run(warm: int, total: int) -> None:
    f = warm_cosine(warm, total)
    for step in (0, 1, warm - 1, warm, total // 2, total - 1, total, total + 7):
        want = min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))
        assert f(step) == want
    assert f(total) == 0.0 and f(total + 7) == 0.0  # the cosine ends at zero and stays there
    assert f(0) == pytest.approx(1 / warm, rel=1e-3)  # the first step is warm-up only


def test_warm_cosine_of_a_run_without_steps_is_defined() -> None:
    assert warm_cosine(0, 0)(0) == 1.0  # LambdaLR evaluates step 0 even when no step follows
