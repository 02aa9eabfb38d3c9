"""Straggler scores: a rank 2x slower than the others is flagged, one slow step is not,
and healthy ranks that scatter are not."""

import random

from service.stragglers import THRESHOLD, WINDOW, Windows, scores


def _windows(medians, noise=0.0, seed=0):
    rng = random.Random(seed)
    return {r: [m * (1 + rng.uniform(-noise, noise)) for _ in range(WINDOW)] for r, m in medians}


def test_a_rank_twice_as_slow_is_flagged_and_no_other():
    for ranks in (2, 4, 8):
        got = scores(_windows([(r, 2.0 if r == 1 else 1.0) for r in range(ranks)], noise=0.1))
        assert got[1] > THRESHOLD
        assert all(s < THRESHOLD for r, s in got.items() if r != 1), got


def test_healthy_ranks_that_scatter_are_not_flagged():
    for seed in range(50):
        got = scores(_windows([(r, 1.0) for r in range(4)], noise=0.2, seed=seed))
        assert max(got.values()) < THRESHOLD, (seed, got)


def test_one_slow_step_is_not_a_straggler():
    windows = _windows([(r, 1.0) for r in range(4)], noise=0.05)
    windows[2][-1] = 10.0  # one step 10x slower
    assert max(scores(windows).values()) < THRESHOLD


def test_windows_take_one_sample_per_new_step_and_wait_for_enough():
    w = Windows()
    for step in (1, 1, 2, 2, 3):  # reports repeat a step
        w.add(0, step, 1.0)
        w.add(1, step, 2.0)
    assert w.scores() == {}  # 3 samples each: not yet
    w.add(0, 4, 1.0)
    w.add(1, 4, 2.0)
    assert w.scores()[1] > THRESHOLD
