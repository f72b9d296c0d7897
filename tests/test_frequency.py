"""AdaptiveFrequency and the base class's decision schedule."""

from __future__ import annotations

import pytest

from core_strategies import ScaleEvery
from ray_metaopt import AdaptiveFrequency


@pytest.mark.parametrize(
    "previous, current, steps, interval, expected",
    [
        (None, 1.0, 0, 8, 8),  # first decision: keep
        (1.0, 0.5, 8, 8, 4),  # |log 0.5|/8 = 0.087 > fast: shorten
        (1.0, 0.99999, 8, 8, 16),  # ~1e-6 per step < slow: lengthen
        (1.0, 0.99, 8, 8, 8),  # 1.3e-3 per step: in between, keep
        (1.0, 0.5, 8, 2, 2),  # floor at min_interval
        (1.0, 1.0, 8, 32, 32),  # ceiling at max_interval
        (-1.0, -2.0, 4, 8, 4),  # non-positive metric: relative difference
    ],
)
def test_next_interval(previous, current, steps, interval, expected):
    rule = AdaptiveFrequency(min_interval=2, max_interval=32, fast_change=1e-2, slow_change=1e-4)
    assert rule.next_interval(interval, previous, current, steps) == expected


def test_schedule_adapts_through_update_hparams():
    meta = ScaleEvery(update_frequency=4, adaptive_frequency={"min_interval": 1, "max_interval": 16})
    decided = []
    loss = 1.0
    for step in range(60):
        if meta.should_update(step):
            meta.update_hparams({"loss": loss}, step)
            decided.append(step)
        loss = loss * 0.5 if step < 10 else loss  # fast at first, then flat
    gaps = [b - a for a, b in zip(decided, decided[1:])]
    assert decided[0] == 3
    assert min(gaps[:3]) < 4  # shortened while the loss fell fast
    assert gaps[-1] == 16  # lengthened to the max on the plateau


def test_schedule_state_round_trips():
    meta = ScaleEvery(update_frequency=4, adaptive_frequency=AdaptiveFrequency(1, 16))
    for step, loss in [(3, 1.0), (7, 0.5)]:
        meta.update_hparams({"loss": loss}, step)
    state = meta.state_dict()
    other = ScaleEvery(update_frequency=4, adaptive_frequency=AdaptiveFrequency(1, 16))
    other.load_state_dict(state)
    assert (other.interval, other.next_update_step, other.calls) == (meta.interval, meta.next_update_step, 2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"min_interval": 0}, ValueError, "min_interval must be >= 1, got min_interval=0"),
        ({"min_interval": 5, "max_interval": 4}, ValueError, "max_interval must be >= min_interval=5"),
        ({"fast_change": -1.0}, ValueError, "fast_change must be in"),
        ({"slow_change": 0.5, "fast_change": 0.1}, ValueError, "slow_change must be in"),
        ({"factor": 1.0}, ValueError, r"factor must be in \(1"),
        ({"monitor": 3}, TypeError, "monitor must be a metric name"),
        ({"min_interval": 1.5}, TypeError, "min_interval must be an int, got min_interval=1.5"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdaptiveFrequency(**kwargs)


def test_adaptive_frequency_type_check():
    with pytest.raises(TypeError, match="adaptive_frequency must be an AdaptiveFrequency"):
        ScaleEvery(adaptive_frequency=5)


# ---------------------------------------------------------------- issue 17
def test_extreme_finite_metrics_never_raise_a_math_error():
    # 1e300 -> 1e-300: the ratio underflows to 0.0 and log(0.0) raised "math domain error".
    rule = AdaptiveFrequency(min_interval=1, max_interval=64)
    assert rule.next_interval(8, 1e300, 1e-300, 10) == 4
    assert rule.next_interval(8, 1e-300, 1e300, 10) == 4
    assert rule.next_interval(8, 5e-324, 1.7e308, 1) == 4
    assert rule.next_interval(8, -1.7e308, 1.7e308, 1) == 4


@pytest.mark.parametrize("previous, current", [(1.0, -1.0), (0.0, 1.0), (1.0, 0.0), (-2.0, -1.0)])
def test_metric_crossing_or_touching_zero_counts_as_fast(previous, current):
    rule = AdaptiveFrequency(min_interval=1, max_interval=64)
    assert rule.next_interval(8, previous, current, 1) == 4


def test_metric_flat_at_zero_counts_as_slow():
    assert AdaptiveFrequency(max_interval=64).next_interval(8, 0.0, 0.0, 1) == 16


def test_non_integer_factor_rounds_growth_up_and_shrink_down():
    rule = AdaptiveFrequency(min_interval=1, max_interval=64, factor=1.5)
    grown = [1]
    for _ in range(4):
        grown.append(rule.next_interval(grown[-1], 1.0, 1.0, 10))
    assert grown == [1, 2, 3, 5, 8]  # ceil: it grows from 1 (floor would stay at 1 forever)
    assert rule.next_interval(8, 1.0, 2.0, 1) == 5  # int(8 / 1.5) == 5


def test_empty_monitor_rejected():
    with pytest.raises(ValueError, match="monitor must be a non-empty metric name, got monitor=''"):
        AdaptiveFrequency(monitor="")
