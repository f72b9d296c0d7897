"""Plateau tests shared by the plateau and expert/gate strategies: strict (torch) and noise-aware.

Both are pure functions over plain data (floats and lists), so the strategies keep their state in
``_state_attrs`` and checkpoints stay plain.

**Strict** (:func:`strict_is_better`): ``torch.optim.lr_scheduler.ReduceLROnPlateau``'s test,
meant for a metric that is exact at each decision (a validation loss per evaluation).

**Noise-aware** (:func:`noisy_verdict`): for a metric that is one noisy sample per decision (the
minibatch loss of that step). A single minibatch loss almost never beats the luckiest one seen
before it, so torch's test calls nearly every decision "no improvement" and cuts every
``patience + 1`` decisions. Here a decision compares the mean of the last ``window`` values with
the best such mean, and counts as an improvement only when it is lower by more than ``k``
standard errors of that mean (or by the strict ``threshold`` margin, whichever is larger), or when
the least-squares slope over the last ``4 * window`` values (all since the last cut, when fewer) is falling by more than ``k`` of its
standard errors (a steady decline whose step-to-step change is far below the noise). Until
``2 * window`` values have been seen (since the start, or since the last cut) a decision is not
counted at all, so no cut can come before there is enough data to tell a trend from noise.
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["count_decision", "mean_and_stderr", "slope_t", "strict_is_better", "noisy_verdict", "NOT_COUNTED"]

NOT_COUNTED = "not_counted"


def strict_is_better(current: float, best: float, threshold: float, threshold_mode: str, mode: str) -> bool:
    """torch's rule: ``current < best - margin`` (``mode="min"``), margin rel or abs; inf best loses."""
    if math.isinf(best):
        return current != best
    margin = threshold * abs(best) if threshold_mode == "rel" else threshold
    if mode == "min":
        return current < best - margin
    return current > best + margin


def count_decision(improved: bool, num_bad: int, cooldown_counter: int) -> tuple[int, int]:
    """torch ``ReduceLROnPlateau``'s counters after one counted decision: ``(num_bad, cooldown_counter)``.

    An improvement resets the bad-decision count, anything else adds one; a decision in cooldown
    counts the cooldown down and resets the bad count. A cut is due when the returned
    ``num_bad > patience``; after a cut the caller restarts with ``(0, cooldown)``.
    """
    num_bad = 0 if improved else num_bad + 1
    if cooldown_counter > 0:
        return 0, cooldown_counter - 1
    return num_bad, cooldown_counter


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); 0 for n < 2). Overflow-safe."""
    n = len(values)
    scale = max(abs(v) for v in values) or 1.0
    ys = [v / scale for v in values]
    mean = sum(ys) / n
    if n < 2:
        return mean * scale, 0.0
    var = sum((y - mean) ** 2 for y in ys) / (n - 1)
    return mean * scale, math.sqrt(var / n) * scale


def slope_t(values: Sequence[float]) -> float:
    """t statistic of the least-squares slope of ``values`` per index (0 when undefined).

    Negative for a falling series; ``-inf`` for a perfectly straight falling line.
    """
    n = len(values)
    if n < 3:
        return 0.0
    scale = max(abs(v) for v in values) or 1.0
    ys = [v / scale for v in values]
    x_mean = (n - 1) / 2.0
    y_mean = sum(ys) / n
    sxx = sum((i - x_mean) ** 2 for i in range(n))
    b = sum((i - x_mean) * (y - y_mean) for i, y in enumerate(ys)) / sxx
    resid = sum((y - y_mean - b * (i - x_mean)) ** 2 for i, y in enumerate(ys))
    se = math.sqrt(resid / (n - 2) / sxx)
    if se == 0.0:
        return 0.0 if b == 0.0 else math.copysign(math.inf, b)
    return b / se


def noisy_verdict(
    recent: Sequence[float],
    best: float,
    *,
    window: int,
    k: float,
    threshold: float,
    threshold_mode: str,
    mode: str,
) -> tuple[str, float, str]:
    """Judge one decision on a noisy metric: ``(verdict, new best, detail)``.

    ``recent`` holds the metric's values since the last cut (the newest last, at most ``2 *
    window`` needed). ``verdict`` is ``"improved"``, ``"not_improved"`` or :data:`NOT_COUNTED`
    (fewer than ``2 * window`` values). ``best`` is the best window mean so far (``inf``/``-inf``:
    none); the returned best is the new one.
    """
    if len(recent) < 2 * window:
        return NOT_COUNTED, best, f"{len(recent)}/{2 * window} values since the last cut"
    sign = 1.0 if mode == "min" else -1.0
    mean, se = mean_and_stderr(recent[-window:])
    if math.isinf(best):
        return "improved", mean, f"first window mean {mean:.6g}"
    strict_margin = threshold * abs(best) if threshold_mode == "rel" else threshold
    margin = max(strict_margin, k * se)
    if sign * (best - mean) > margin:
        return "improved", mean, f"window mean {mean:.6g} beats best {best:.6g} by > {margin:.3g}"
    history = recent[-4 * window :]
    t = slope_t(history) * sign
    better = mean if sign * (best - mean) > 0 else best
    if t < -k:
        return "improved", better, f"falling: slope t={t:.3g} over {len(history)} values"
    return (
        "not_improved",
        best,
        f"window mean {mean:.6g} (+-{se:.3g}) within {margin:.3g} of best {best:.6g}, slope t={t:.3g}",
    )
