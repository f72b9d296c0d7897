"""Adaptive update frequency: decide more often while training changes fast, less on a plateau."""

from __future__ import annotations

import math
from typing import Any, Mapping

from ._validation import check_int, check_range


class AdaptiveFrequency:
    """Rule that lengthens or shortens the interval between decisions with the training phase.

    After each decision the relative change of the monitored metric since the previous decision
    (``|log(m_now / m_prev)|`` for positive metrics) is divided by the steps between them. Faster
    than ``fast_change`` per step halves the interval (down to ``min_interval``); slower than
    ``slow_change`` per step doubles it (up to ``max_interval``).

    Args:
        min_interval: shortest interval between decisions, in steps (>= 1).
        max_interval: longest interval between decisions, in steps (>= min_interval).
        fast_change: relative change per step above which the interval shrinks.
        slow_change: relative change per step below which the interval grows.
        factor: how much the interval shrinks or grows at once (> 1).
        monitor: the metric whose change sets the pace.

    Example:
        >>> from ray_metaopt import PlateauMetaOptimizer
        >>> meta = PlateauMetaOptimizer(update_frequency=10,
        ...     adaptive_frequency=AdaptiveFrequency(min_interval=5, max_interval=80))
    """

    def __init__(
        self,
        min_interval: int = 1,
        max_interval: int = 100,
        fast_change: float = 1e-2,
        slow_change: float = 1e-4,
        factor: float = 2.0,
        monitor: str = "loss",
    ) -> None:
        self.min_interval = check_int("min_interval", min_interval, minimum=1)
        self.max_interval = check_int("max_interval", max_interval, minimum=1)
        if self.max_interval < self.min_interval:
            raise ValueError(
                f"max_interval must be >= min_interval={self.min_interval}, got max_interval={max_interval}"
            )
        self.fast_change = check_range("fast_change", fast_change, 0.0, math.inf, low_open=True)
        self.slow_change = check_range("slow_change", slow_change, 0.0, self.fast_change, low_open=True)
        self.factor = check_range("factor", factor, 1.0, math.inf, low_open=True, high_open=True)
        if not isinstance(monitor, str):
            raise TypeError(f"monitor must be a metric name (str), got monitor={monitor!r}")
        if not monitor:
            raise ValueError(f"monitor must be a non-empty metric name, got monitor={monitor!r}")
        self.monitor = monitor

    def next_interval(self, interval: int, previous: float | None, current: float | None, steps: int) -> int:
        """The interval to use after a decision, given the monitored metric then and now."""
        if previous is None or current is None or steps <= 0:
            return min(max(interval, self.min_interval), self.max_interval)
        if previous > 0 and current > 0:
            # log(a) - log(b), not log(a / b): the ratio of finite metrics can under- or overflow
            # (1e-300 / 1e300 == 0.0, a math domain error).
            change = abs(math.log(current) - math.log(previous))
        else:
            # Through or at zero: the change relative to the previous value (a change from 0 is fast).
            change = abs(current - previous) / (abs(previous) + 1e-12)
        rate = change / steps
        if rate > self.fast_change:
            interval = int(interval / self.factor)
        elif rate < self.slow_change:
            interval = int(math.ceil(interval * self.factor))
        return min(max(interval, self.min_interval), self.max_interval)

    def config(self) -> dict[str, Any]:
        return {
            "min_interval": self.min_interval,
            "max_interval": self.max_interval,
            "fast_change": self.fast_change,
            "slow_change": self.slow_change,
            "factor": self.factor,
            "monitor": self.monitor,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | "AdaptiveFrequency" | None) -> "AdaptiveFrequency | None":
        if config is None or isinstance(config, AdaptiveFrequency):
            return config
        if isinstance(config, Mapping):
            return cls(**config)
        raise TypeError(
            f"adaptive_frequency must be an AdaptiveFrequency, a dict of its arguments or None, "
            f"got adaptive_frequency={config!r}"
        )
