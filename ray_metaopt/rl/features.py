"""The RL policy's state: a fixed-size, normalised, finite vector built from training dynamics.

The state of one decision is one *row* per acting unit: the global features (the same for every
param group) followed by the group's own features. In the default mode one row describes the
whole optimizer (group features averaged over groups); with ``per_group=True`` there is one row
per param group. The layout never depends on the model, so a policy learned on one model can act
on another.

Most features are scale-free (logs of ratios to the run's first values, trends per step); three
carry absolute scale, so a policy can tell a too-small lr from a too-large one at the same loss
dynamics: the log-loss itself, the group's lr on a log10 scale, and the log of the multiplier the
policy's last action applied to the base lr. Every feature is clamped to ``[-clip, clip]``;
missing metrics give 0 plus a "has_..." flag, so the policy sees the same vector whatever the
task reports.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .._validation import check_finite, check_int, check_range
from ..base import GroupState

GLOBAL_FEATURES: tuple[str, ...] = (
    "log_loss_ratio",  # log(loss / first loss)
    "loss_trend_fast",  # EMAs of d log(loss) per step, three horizons
    "loss_trend_mid",
    "loss_trend_slow",
    "loss_volatility",  # EMA of |fast change - fast trend|: noise / instability
    "log_grad_norm_ratio",
    "grad_norm_trend",
    "has_grad_norm",
    "progress",  # step / total_steps in [0, 1]
    "has_progress",
    "log_step_time_ratio",  # cost: step time relative to the first one seen
    "has_step_time",
    "val_gap",  # log(val_loss / loss): generalisation gap
    "has_val_loss",
    "log_interval",  # log2(decision interval / update_frequency) (adaptive frequency)
    "log_loss",  # absolute: log(loss - loss_floor)
)
GROUP_FEATURES: tuple[str, ...] = (
    "log_lr_ratio",  # log(lr / initial lr)
    "wd_shift",  # asinh((wd - initial wd) / wd_unit)
    "log10_lr",  # absolute: log10(lr) + 3 (0 at lr 1e-3)
    "log_multiplier",  # previous action: log(lr / base lr) the policy set at its last decision
)
STATE_DIM = len(GLOBAL_FEATURES) + len(GROUP_FEATURES)

# EMA rates of the three loss-trend horizons (per decision): about 2, 10 and 50 decisions.
_TREND_RATES = (0.5, 0.1, 0.02)
# Per-step changes of log-loss are ~1e-4..1e-2; asinh(1000 x) maps them to ~0.1..3.
_TREND_SCALE = 1000.0


def _clamp(x: float, clip: float) -> float:
    if not math.isfinite(x):
        return 0.0 if math.isnan(x) else math.copysign(clip, x)
    return min(max(x, -clip), clip)


def _log_ratio(x: float, ref: float) -> float:
    if x <= 0.0 or ref <= 0.0:
        return 0.0
    return math.log(x) - math.log(ref)  # x / ref can underflow to 0 or overflow to inf


class FeatureExtractor:
    """Turns the metrics of successive decisions into policy states.

    Stateless itself: it updates a plain-data ``state`` dict (see :meth:`initial_state`) that the
    meta-optimizer keeps in its ``state_dict``, so a resumed run sees exactly the same features.

    Args:
        update_frequency: the nominal decision interval; trends are per step, intervals are
            reported relative to it.
        total_steps: training steps of the run, for the ``progress`` feature (``None``: unknown).
        wd_unit: the weight-decay change that counts as one unit in ``wd_shift`` (the largest
            weight-decay action, typically).
        loss_floor: a lower bound of the loss; log-losses are taken of ``loss - loss_floor``.
        clip: every feature is clamped to ``[-clip, clip]``.

    Example:
        >>> fx = FeatureExtractor(update_frequency=10, total_steps=1000)
        >>> state = fx.initial_state()
        >>> fx.observe(state, {"loss": 2.3, "grad_norm": 1.5}, step=9)
        >>> len(fx.global_features(state, step=9, interval=10))
        16
    """

    def __init__(
        self,
        update_frequency: int = 10,
        total_steps: int | None = None,
        wd_unit: float = 1e-5,
        loss_floor: float = 0.0,
        clip: float = 5.0,
    ) -> None:
        self.update_frequency = check_int("update_frequency", update_frequency, minimum=1)
        self.total_steps = None if total_steps is None else check_int("total_steps", total_steps, minimum=1)
        self.wd_unit = check_range("wd_unit", wd_unit, 0.0, math.inf, low_open=True, high_open=True)
        self.loss_floor = check_finite("loss_floor", loss_floor)
        self.clip = check_range("clip", clip, 0.0, math.inf, low_open=True, high_open=True)

    @staticmethod
    def initial_state() -> dict[str, Any]:
        """The state before any metric (plain data)."""
        return {
            "loss0": None,  # first log-loss
            "log_loss": None,  # latest log-loss
            "step": None,  # step of the latest observation
            "trends": [0.0] * len(_TREND_RATES),
            "volatility": 0.0,
            "grad0": None,
            "log_grad": None,
            "grad_trend": 0.0,
            "time0": None,
            "step_time": None,
            "val_loss": None,
            "val0": None,
        }

    def log_loss(self, loss: float) -> float:
        """``log(loss - loss_floor)``, finite (a loss at or below the floor counts as 1e-12 above it)."""
        above = min(loss - self.loss_floor, sys.float_info.max)  # a finite loss near 1e308 minus a floor
        return math.log(max(above, 1e-12))

    def observe(self, state: dict[str, Any], metrics: Mapping[str, float], step: int) -> None:
        """Fold one decision step's metrics into ``state``. ``metrics["loss"]`` is required."""
        log_loss = self.log_loss(metrics["loss"])
        steps = step - state["step"] if state["step"] is not None else 0
        if state["loss0"] is None:
            state["loss0"] = log_loss
        if state["log_loss"] is not None and steps > 0:
            change = (log_loss - state["log_loss"]) / steps
            fast_before = state["trends"][0]
            state["trends"] = [t + rate * (change - t) for t, rate in zip(state["trends"], _TREND_RATES)]
            state["volatility"] += _TREND_RATES[1] * (abs(change - fast_before) - state["volatility"])
        state["log_loss"] = log_loss

        grad = metrics.get("grad_norm")
        if grad is not None and grad > 0.0:
            log_grad = math.log(grad)
            if state["grad0"] is None:
                state["grad0"] = log_grad
            if state["log_grad"] is not None and steps > 0:
                change = (log_grad - state["log_grad"]) / steps
                state["grad_trend"] += _TREND_RATES[1] * (change - state["grad_trend"])
            state["log_grad"] = log_grad

        step_time = metrics.get("step_time")
        if step_time is not None and step_time > 0.0:
            if state["time0"] is None:
                state["time0"] = step_time
            state["step_time"] = step_time

        val = metrics.get("val_loss")
        if val is not None:
            if state["val0"] is None:
                state["val0"] = val
            state["val_loss"] = val
        state["step"] = step

    def progress(self, step: int) -> float | None:
        """Fraction of the run done at ``step`` (``None`` when ``total_steps`` is unknown)."""
        if self.total_steps is None:
            return None
        return min(max((step + 1) / self.total_steps, 0.0), 1.0)

    def global_features(self, state: Mapping[str, Any], step: int, interval: int) -> list[float]:
        """The features shared by every row (order: :data:`GLOBAL_FEATURES`)."""
        c = self.clip
        log_loss = state["log_loss"] if state["log_loss"] is not None else 0.0
        loss0 = state["loss0"] if state["loss0"] is not None else log_loss
        trends = [math.asinh(_TREND_SCALE * t) for t in state["trends"]]
        has_grad = state["log_grad"] is not None
        progress = self.progress(step)
        has_time = state["step_time"] is not None
        has_val = state["val_loss"] is not None
        values = [
            log_loss - loss0,
            *trends,
            math.asinh(_TREND_SCALE * state["volatility"]),
            state["log_grad"] - state["grad0"] if has_grad else 0.0,
            math.asinh(_TREND_SCALE * state["grad_trend"]) if has_grad else 0.0,
            float(has_grad),
            progress if progress is not None else 0.0,
            float(progress is not None),
            _log_ratio(state["step_time"], state["time0"]) if has_time else 0.0,
            float(has_time),
            self.log_loss(state["val_loss"]) - log_loss if has_val else 0.0,
            float(has_val),
            math.log2(max(interval, 1) / self.update_frequency),
            log_loss,
        ]
        return [_clamp(v, c) for v in values]

    def group_features(self, group: GroupState, multiplier: float = 1.0) -> list[float]:
        """The features of one param group (order: :data:`GROUP_FEATURES`).

        ``multiplier`` is the factor the policy's last action applied to the group's base lr
        (1 before any action, or when actions compound on the lr itself).
        """
        wd_shift = 0.0
        if group.weight_decay is not None and group.initial_weight_decay is not None:
            wd_shift = math.asinh((group.weight_decay - group.initial_weight_decay) / self.wd_unit)
        log10_lr = math.log10(group.lr) + 3.0 if group.lr > 0.0 else -self.clip
        values = [
            _log_ratio(group.lr, group.initial_lr),
            wd_shift,
            log10_lr,
            math.log(multiplier) if multiplier > 0.0 else 0.0,
        ]
        return [_clamp(v, self.clip) for v in values]

    def mean_group_features(self, groups: Sequence[GroupState], multipliers: Sequence[float] = ()) -> list[float]:
        """Group features averaged over ``groups`` (the single row of the default, global mode).

        ``multipliers[i]`` goes with ``groups[i]`` (1 where missing).
        """
        if not groups:
            return [0.0] * len(GROUP_FEATURES)
        rows = [self.group_features(g, multipliers[i] if i < len(multipliers) else 1.0) for i, g in enumerate(groups)]
        return [sum(col) / len(rows) for col in zip(*rows)]
