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
