"""The benchmark's statistics on hand-made numbers (every expected value worked out by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ray_metaopt.bench.stats import (
    best_setting,
    episode_return,
    executed_steps,
    log_grid,
    mean_lr_factors,
    paired_comparison,
    quantile,
    robustness,
    sign_test_p,
    steps_to_target,
    summarize,
)

INF = math.inf


@pytest.mark.parametrize(
    "values, q, expected",
    [
        ([1.0, 2.0, 3.0, 4.0], 0.5, 2.5),
        ([1.0, 2.0, 3.0, 4.0], 0.25, 1.75),  # position 0.75 between 1 and 2
        ([1.0, 2.0, 3.0, 4.0], 0.75, 3.25),
        ([5.0], 0.3, 5.0),
        ([3.0, 1.0, 2.0], 0.5, 2.0),  # unsorted input
        ([1.0, 2.0, INF], 0.5, 2.0),  # one diverged run of three: the median stays finite
        ([1.0, INF, INF], 0.5, INF),  # most runs diverged: infinite median
        ([1.0, 2.0, INF, INF], 0.5, INF),  # interpolating towards inf gives inf (numpy: inf or nan)
        ([1.0, 2.0, 3.0, INF], 0.25, 1.75),
    ],
)
def test_quantile(values, q, expected):
    assert quantile(values, q) == pytest.approx(expected)


def test_quantile_matches_numpy_on_finite_values():
    rng = np.random.default_rng(0)
    for _ in range(20):
        xs = rng.lognormal(size=int(rng.integers(1, 12))).tolist()
        for q in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0):
            assert quantile(xs, q) == pytest.approx(float(np.quantile(xs, q)))


@pytest.mark.parametrize(
    "values, error",
    [([], ValueError), ([1.0, math.nan], ValueError)],
)
def test_quantile_rejects_empty_and_nan(values, error):
    with pytest.raises(error):
        quantile(values, 0.5)


def test_quantile_rejects_q_outside_unit_interval():
    with pytest.raises(ValueError, match=r"q must be in \[0, 1\], got q=1.5"):
        quantile([1.0], 1.5)


def test_summarize():
    s = summarize([0.4, 0.1, INF, 0.2, 0.3])
    assert (s.n, s.median, s.q25, s.q75, s.low, s.high, s.num_inf) == (5, 0.3, 0.2, 0.4, 0.1, INF, 1)


@pytest.mark.parametrize(
    "wins, losses, expected",
    [
        (5, 0, 0.0625),  # 2 * (1/32)
        (0, 5, 0.0625),
        (4, 1, 0.375),  # 2 * (1 + 5) / 32
        (9, 1, 0.021484375),  # 2 * (1 + 10) / 1024
        (3, 3, 1.0),  # capped at 1
        (0, 0, 1.0),  # nothing to test
        (1, 0, 1.0),
    ],
)
def test_sign_test_p(wins, losses, expected):
    assert sign_test_p(wins, losses) == pytest.approx(expected)


def test_paired_comparison_counts_wins_losses_ties_on_common_seeds():
    candidate = {0: 1.0, 1: 2.0, 2: 3.0, 3: INF, 4: 0.5, 9: 0.1}  # seed 9: no reference, left out
    reference = {0: 2.0, 1: 2.0, 2: 1.0, 3: INF, 4: 1.0, 5: 7.0}
    c = paired_comparison(candidate, reference)
    assert (c.n, c.wins, c.losses, c.ties) == (5, 2, 1, 2)
    # ratios: 0.5, 1.0, 3.0, 1.0 (both diverged), 0.5 -> sorted 0.5, 0.5, 1, 1, 3 -> median 1
    assert c.median_ratio == 1.0
    assert c.p_value == pytest.approx(1.0)  # 2 wins vs 1 loss: 2 * (1 + 3) / 8 = 1


def test_paired_comparison_diverged_candidate_loses():
    c = paired_comparison({0: INF, 1: 1.0}, {0: 1.0, 1: 2.0})
    assert (c.wins, c.losses) == (1, 1)
    assert c.median_ratio == INF  # ratios inf and 0.5: the median of two interpolates towards inf


def test_paired_comparison_without_common_seeds_is_none():
    assert paired_comparison({0: 1.0}, {1: 1.0}) is None


@pytest.mark.parametrize(
    "results, expected",
    [
        ({1e-3: [0.5, 0.4, 0.6], 1e-2: [0.3, 0.35, INF]}, 1e-2),  # medians 0.5 vs 0.35
        ({1e-3: [0.2, 0.2], 1e-2: [0.2, 0.2]}, 1e-3),  # a tie goes to the smaller lr
        ({1e-3: [INF, INF, 0.1], 1e-2: [1.0, 1.0, 1.0]}, 1e-2),  # mostly diverged loses
    ],
)
def test_best_setting(results, expected):
    assert best_setting(results) == expected


@pytest.mark.parametrize(
    "steps, losses, target, expected",
    [
        ([20, 40, 60], [0.5, 0.2, 0.1], 0.2, 40),  # at or below the target
        ([20, 40, 60], [0.5, 0.3, 0.25], 0.2, None),
        ([20, 40], [math.nan, 0.1], 0.2, 40),  # a NaN evaluation never counts
        ([], [], 1.0, None),
    ],
)
def test_steps_to_target(steps, losses, target, expected):
    assert steps_to_target(steps, losses, target) == expected


@pytest.mark.parametrize(
    "steps, interval, expected",
    [
        ([20, 40, 60], 20, 60),
        ([20, 40, 50], 20, 50),  # last evaluation at the budget, 10 steps after the previous one
        ([20, 40, 47], 20, 47),  # diverged at step 47
        ([20, 40, 60, 40, 60], 20, 100),  # PBT restored a step-20 checkpoint after step 60
        ([20, 40, 80], 20, 60),  # restored a step-60 checkpoint (a jump forward): 20 trained steps
        ([], 20, 0),
    ],
)
def test_executed_steps(steps, interval, expected):
    assert executed_steps(steps, interval) == expected


def test_episode_return_telescopes_rewards():
    # log(1/0.25) + log(2/1) = 2 log 2 + log 2
    assert episode_return([1.0, 0.5, 0.25], [2.0, 1.5, 1.0]) == pytest.approx(3 * math.log(2))
    assert episode_return([1.0, 0.25], [2.0, 1.0], val_weight=0.0) == pytest.approx(2 * math.log(2))
    assert episode_return([1.0, math.nan], [2.0, 1.0]) == -INF


@pytest.mark.parametrize(
    "trajectories, expected",
    [
        ([[(10, 2.0)], [(10, 0.5), (20, 2.0)]], [[10, 1.0], [20, 2.0]]),
        ([[(10, 0.5), (20, 0.25)]], [[10, 0.5], [20, 0.25]]),  # one run: replayed exactly
        ([[(10, 4.0)], []], [[10, 2.0]]),  # a run that never changed counts as factor 1
        ([[(10, 2.0)], [(20, 0.5)]], [[10, math.sqrt(2.0)], [20, 1.0]]),
        ([[(10, 2.0), (20, 2.0)], [(10, 2.0)]], [[10, 2.0]]),  # no repeated entries
        ([], []),
    ],
)
def test_mean_lr_factors_is_a_geometric_mean_in_force_at_each_change(trajectories, expected):
    got = mean_lr_factors(trajectories)
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [f for _, f in got] == pytest.approx([f for _, f in expected])


def test_robustness():
    r = robustness({1e-3: [2.0, 2.0, 3.0], 1e-2: [1.0, 1.0, INF], 1e-1: [4.0, INF, INF]}, task_best=0.5)
    assert r.medians == {1e-3: 2.0, 1e-2: 1.0, 1e-1: INF}
    assert (r.worst, r.geo_mean, r.worst_over_best) == (INF, INF, INF)
    r = robustness({1e-3: [4.0], 1e-2: [1.0]}, task_best=0.5)
    assert (r.worst, r.geo_mean, r.worst_over_best) == (4.0, pytest.approx(2.0), 8.0)


def test_log_grid_spans_three_decades_in_five_points():
    assert log_grid(1e-4, 1e-1, 5) == [1e-4, 5.62e-4, 3.16e-3, 1.78e-2, 1e-1]
    assert log_grid(1e-3, 1e-3, 1) == [1e-3]
    with pytest.raises(ValueError, match="high must be in"):
        log_grid(1e-2, 1e-3, 3)
