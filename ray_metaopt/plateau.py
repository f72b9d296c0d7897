"""Plateau strategies: cut the learning rate when the monitored loss stops improving.

:class:`PlateauMetaOptimizer` is ``torch.optim.lr_scheduler.ReduceLROnPlateau`` as a
meta-optimizer (same ``patience``/``threshold``/``cooldown`` semantics, every param group, per-group
bounds, checkpointable) plus weight decay raised on high gradient norms.
:class:`AdvancedPlateauMetaOptimizer` adds a warmup ramp, loss-trend and relative-change plateau
criteria, and overfitting monitoring (train/val gap, weight-norm growth).

Counting is in *decisions*, not steps: a decision happens every ``update_frequency`` steps (or
whenever :class:`~ray_metaopt.AdaptiveFrequency` says), so ``patience=3`` with
``update_frequency=100`` waits 400 steps without improvement before a cut (the 4th bad
decision cuts, as in torch).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from typing import Any, Mapping, Sequence

from ._validation import check_choice, check_int, check_range
from .base import GroupState, HParamUpdate, MetaOptimizer
from .metrics import first_non_finite
from .plateau_tracker import NOT_COUNTED, count_decision, mean_and_stderr, noisy_verdict, slope_t, strict_is_better

__all__ = ["PlateauMetaOptimizer", "AdvancedPlateauMetaOptimizer", "relative_slope", "slope"]

_MODES = ("min", "max")
_THRESHOLD_MODES = ("rel", "abs")
_CRITERIA = ("all", "any")
_OVERFIT_ACTIONS = ("weight_decay", "lr", "both")
# Metrics whose value at a decision is exact (computed on a fixed set), not one minibatch's sample.
_EXACT_METRIC_PREFIXES = ("val", "eval", "test", "valid")


def _resolve_noise_aware(noise_aware: Any, monitor: str) -> bool:
    if noise_aware == "auto":
        return not monitor.lower().startswith(_EXACT_METRIC_PREFIXES)
    if isinstance(noise_aware, bool):
        return noise_aware
    raise TypeError(f"noise_aware must be True, False or 'auto', got noise_aware={noise_aware!r}")


def default_window(patience: int, update_frequency: int = 1) -> int:
    """The noise-aware window in decisions: ``max(2 * (patience + 1), ceil(60 / update_frequency))``.

    About 60 steps of data per window mean, and 120 for the slope test and before the first
    decision counts. On the development seeds of ``benchmarks/seed_usage.py`` windows of 30 and
    40 steps still cut minibatch losses that were falling (x1.15 and x1.04 the unwrapped final
    loss on the regression task).
    """
    return max(2 * (patience + 1), -(-60 // update_frequency))


def _check_metric_name(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a metric name (non-empty str), got {name}={value!r}")
    return value


def _check_group_selection(value: Any) -> list[str | int] | None:
    if value is None:
        return None
    if isinstance(value, (str, int)):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(
            f"groups must be None or a non-empty list of group names, roles or indices, got groups={value!r}"
        )
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise TypeError(f"groups entries must be str (name or role) or int (index), got groups={value!r}")
        if isinstance(item, int) and item < 0:
            raise ValueError(f"groups indices must be >= 0, got groups={value!r}")
    return list(value)


def _scaled_slope(values: Sequence[float]) -> tuple[float, float, float]:
    """(slope, mean magnitude, scale) of ``values / scale``, ``scale = max |value|``: no overflow."""
    n = len(values)
    scale = max(abs(v) for v in values)
    if scale == 0.0:
        return 0.0, 0.0, 0.0
    ys = [v / scale for v in values]
    x_mean = (n - 1) / 2.0
    y_mean = sum(ys) / n
    num = sum((i - x_mean) * (y - y_mean) for i, y in enumerate(ys))
    den = sum((i - x_mean) ** 2 for i in range(n))
    return num / den, sum(abs(y) for y in ys) / n, scale


def slope(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` per index (0 for fewer than two values).

    Example:
        >>> slope([1.0, 3.0, 5.0])
        2.0
    """
    if len(values) < 2:
        return 0.0
    scaled, _, scale = _scaled_slope(values)
    return scaled * scale


def relative_slope(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` (one per decision) divided by their mean magnitude.

    ``-0.01`` means the fitted line falls by 1% of the level per decision. Scale-invariant and
    overflow-safe for huge values; 0 for fewer than two values or an all-zero series.

    Example:
        >>> relative_slope([4.0, 3.0, 2.0])
        -0.3333333333333333
    """
    if len(values) < 2:
        return 0.0
    scaled, level, _ = _scaled_slope(values)
    return scaled / level if level > 0 else 0.0


class PlateauMetaOptimizer(MetaOptimizer):
    """Cut every param group's learning rate when the monitored metric plateaus.

    At each decision the monitored metric is compared with the best value so far (improvement
    means ``current < best - threshold * |best|`` for ``threshold_mode="rel"``, ``current < best -
    threshold`` for ``"abs"``; reversed for ``mode="max"``). After more than ``patience`` decisions
    without improvement every selected group's lr is multiplied by ``lr_factor`` (kept within
    ``min_lr``/``max_lr``; a cut smaller than ``eps`` is not made), and the next ``cooldown``
    decisions make no cut. This is ``torch.optim.lr_scheduler.ReduceLROnPlateau``'s rule, with
    the same defaults, counted in decisions; ``"rel"`` uses ``|best|`` so negative metrics work
    (identical to torch for positive values).

    Weight decay: when ``grad_norm_threshold`` is set and the ``grad_norm`` metric exceeds it at a
    decision, each selected group's weight decay becomes ``max(wd * weight_decay_factor, wd +
    min_weight_decay_step)`` (so a group at 0 starts at ``min_weight_decay_step``), capped at
    ``max_weight_decay_factor`` times its initial value (times ``min_weight_decay_step`` for groups
    that started at 0) and at ``max_weight_decay``. Groups that start at weight decay 0 while
    another group has weight decay are treated as deliberate no-decay groups (biases, norms) and
    are never raised.

    Args:
        patience: bad decisions tolerated before a cut (>= 0).
        lr_factor: lr multiplier of a cut, in (0, 1).
        threshold: minimum improvement over the best value that counts (>= 0).
        threshold_mode: ``"rel"`` (fraction of ``|best|``) or ``"abs"``.
        cooldown: decisions after a cut during which bad decisions are not counted (>= 0).
        mode: ``"min"`` (loss) or ``"max"`` (accuracy-like metrics).
        monitor: the metric name to watch (``"loss"``, ``"val_loss"``, ...); it must be in the
            metrics at every decision (``KeyError`` naming it and the metrics received otherwise).
        eps: lr changes smaller than this are ignored (torch's ``eps``).
        grad_norm_threshold: raise weight decay when ``grad_norm`` exceeds this; ``None`` (default)
            turns it off. When set, ``grad_norm`` must be in the metrics at every decision.
        weight_decay_factor: weight decay multiplier when raised (> 1).
        min_weight_decay_step: smallest weight decay increase (>= 0); the value a group at 0 gets.
        max_weight_decay_factor: cap on weight decay relative to the group's initial value
            (>= 1, ``None`` for no relative cap; ``max_weight_decay`` always applies).
        groups: names, roles or indices of the param groups to act on (``None``: all groups).
            Unknown names raise ``ValueError`` when the wrapper is built.
        **base: the :class:`~ray_metaopt.MetaOptimizer` arguments, by keyword: ``update_frequency``
            (default 1), ``min_lr``, ``max_lr``, ``max_weight_decay``, ``adaptive_frequency``.

    Example:
        >>> meta = PlateauMetaOptimizer(patience=3, lr_factor=0.5)
        >>> opt = OptimizerWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3), meta)
        >>> opt.update_hyperparameters({"loss": loss.item()})  # each step, before opt.step()
    """

    _state_attrs = ("best", "num_bad_decisions", "cooldown_counter", "num_cuts", "recent", "grad_norm_recent")

    def __init__(
        self,
        patience: int = 10,
        lr_factor: float = 0.1,
        *,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        mode: str = "min",
        monitor: str = "loss",
        eps: float = 1e-8,
        grad_norm_threshold: float | None = None,
        weight_decay_factor: float = 1.5,
        min_weight_decay_step: float = 1e-4,
        max_weight_decay_factor: float | None = 10.0,
        groups: Sequence[str | int] | None = None,
        noise_aware: bool | str = "auto",
        window: int | None = None,
        noise_k: float = 1.0,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        self.patience = check_int("patience", patience, minimum=0)
        self.lr_factor = check_range("lr_factor", lr_factor, 0.0, 1.0, low_open=True, high_open=True)
        self.threshold = check_range("threshold", threshold, 0.0, math.inf, high_open=True)
        self.threshold_mode = check_choice("threshold_mode", threshold_mode, _THRESHOLD_MODES)
        self.cooldown = check_int("cooldown", cooldown, minimum=0)
        self.mode = check_choice("mode", mode, _MODES)
        self.monitor = _check_metric_name("monitor", monitor)
        self.eps = check_range("eps", eps, 0.0, math.inf, high_open=True)
        if grad_norm_threshold is not None:
            grad_norm_threshold = check_range(
                "grad_norm_threshold", grad_norm_threshold, 0.0, math.inf, high_open=True
            )
        self.grad_norm_threshold = grad_norm_threshold
        self.weight_decay_factor = check_range(
            "weight_decay_factor", weight_decay_factor, 1.0, math.inf, low_open=True, high_open=True
        )
        self.min_weight_decay_step = check_range(
            "min_weight_decay_step", min_weight_decay_step, 0.0, math.inf, high_open=True
        )
        if max_weight_decay_factor is not None:
            max_weight_decay_factor = check_range(
                "max_weight_decay_factor", max_weight_decay_factor, 1.0, math.inf, high_open=True
            )
        self.max_weight_decay_factor = max_weight_decay_factor
        self.groups = _check_group_selection(groups)
        self.noise_aware = _resolve_noise_aware(noise_aware, self.monitor)
        if window is None:
            window = default_window(self.patience, self.update_frequency)
        self.window = check_int("window", window, minimum=2)
        self.noise_k = check_range("noise_k", noise_k, 0.0, math.inf, high_open=True)
        self.reset()

    # ----------------------------------------------------------------- state
    def _init_state(self) -> None:
        self.best = math.inf if self.mode == "min" else -math.inf
        self.num_bad_decisions = 0
        self.cooldown_counter = 0
        self.num_cuts = 0
        self.recent: list[float] = []  # noise-aware: monitored values since the last cut
        self.grad_norm_recent: list[float] = []  # noise-aware: the last `window` grad norms
        self.last_detail = ""  # text of the last noise-aware verdict (for decision reasons only)

    # ----------------------------------------------------------------- groups and bounds
    def check_groups(self, groups: Sequence[GroupState]) -> None:
        super().check_groups(groups)
        if self.groups is None:
            return
        labels = {g.name for g in groups if g.name} | {g.role for g in groups if g.role}
        for item in self.groups:
            if isinstance(item, int) and item >= len(groups):
                raise ValueError(
                    f"groups names param group index {item}, "
                    f"but the optimizer has {len(groups)} param groups, "
                    f"got groups={self.groups}"
                )
            if isinstance(item, str) and item not in labels:
                raise ValueError(
                    f"groups names unknown param group {item!r}; groups and roles are {sorted(labels)}, "
                    f"got groups={self.groups}"
                )

    def selects(self, group: GroupState) -> bool:
        """Whether this strategy acts on ``group`` (see ``groups``)."""
        if self.groups is None:
            return True
        return (
            group.index in self.groups
            or group.name in self.groups
            or (bool(group.role) and group.role in self.groups)
        )

    def _weight_decay_reference(self, group: GroupState) -> float:
        initial = group.initial_weight_decay or 0.0
        return initial if initial > 0 else self.min_weight_decay_step

    def weight_decay_bounds(self, group: GroupState) -> tuple[float, float]:
        low, high = super().weight_decay_bounds(group)
        if self.max_weight_decay_factor is not None:
            high = min(high, self.max_weight_decay_factor * self._weight_decay_reference(group))
        return low, high

    # ----------------------------------------------------------------- metric helpers
    def _require(self, metrics: Mapping[str, float], name: str, step: int, why: str) -> float:
        if name not in metrics:
            raise KeyError(
                f"{type(self).__name__} needs metric {name!r} ({why}) at every decision, but the metrics "
                f"at step {step} were {sorted(metrics)}; pass it to update_hyperparameters()"
            )
        return float(metrics[name])

    def _is_better(self, current: float, best: float) -> bool:
        return strict_is_better(current, best, self.threshold, self.threshold_mode, self.mode)

    def _track_best(self, current: float) -> bool:
        """Update best / bad-decision / cooldown counters (torch's order). True when a cut is due.

        Noise-aware: ``best`` is the best window mean, and a decision before ``window`` values
        have been seen since the last cut neither counts as bad nor cuts (cooldown still runs).
        """
        if self.noise_aware:
            self.recent.append(current)
            del self.recent[: -4 * self.window]
            verdict, self.best, self.last_detail = noisy_verdict(
                self.recent,
                self.best,
                window=self.window,
                k=self.noise_k,
                threshold=self.threshold,
                threshold_mode=self.threshold_mode,
                mode=self.mode,
            )
            improved = verdict == "improved"
            if verdict == NOT_COUNTED:
                if self.cooldown_counter > 0:
                    self.cooldown_counter -= 1
                return False
        else:
            improved = self._is_better(current, self.best)
            if improved:
                self.best = current
        self.num_bad_decisions, self.cooldown_counter = count_decision(
            improved, self.num_bad_decisions, self.cooldown_counter
        )
        return self.num_bad_decisions > self.patience

    def _after_cut(self) -> None:
        self.cooldown_counter = self.cooldown
        self.num_bad_decisions = 0
        self.num_cuts += 1
        self.recent = []  # the lr changed: judge the new regime on its own values

    # ----------------------------------------------------------------- proposals
    def _cut_lr(self, groups: Sequence[GroupState], reason: str) -> list[HParamUpdate]:
        updates = []
        for g in groups:
            if not self.selects(g):
                continue
            low, high = self.lr_bounds(g)
            new = min(max(g.lr * self.lr_factor, low), high)
            if g.lr - new > self.eps:
                updates.append(HParamUpdate(g.index, "lr", new, reason))
        return updates

    def _decay_eligible(self, group: GroupState, groups: Sequence[GroupState]) -> bool:
        if group.weight_decay is None or not self.selects(group):
            return False
        if (group.initial_weight_decay or 0.0) > 0:
            return True
        # A zero-decay group next to decayed groups is a deliberate no-decay group (biases, norms).
        return not any((g.initial_weight_decay or 0.0) > 0 for g in groups)

    def _raise_weight_decay(self, groups: Sequence[GroupState], reason: str) -> list[HParamUpdate]:
        updates = []
        for g in groups:
            if not self._decay_eligible(g, groups):
                continue
            wd = float(g.weight_decay)
            new = max(wd * self.weight_decay_factor, wd + self.min_weight_decay_step)
            new = min(new, self.weight_decay_bounds(g)[1])
            if new > wd and math.isfinite(new):
                updates.append(HParamUpdate(g.index, "weight_decay", new, reason))
        return updates

    def _grad_norm_reason(self, metrics: Mapping[str, float], step: int) -> str | None:
        if self.grad_norm_threshold is None:
            return None
        grad_norm = self._require(
            metrics, "grad_norm", step, f"grad_norm_threshold={self.grad_norm_threshold:g}"
        )
        if not self.noise_aware:
            if grad_norm > self.grad_norm_threshold:
                return f"grad_norm {grad_norm:.4g} > grad_norm_threshold {self.grad_norm_threshold:.4g}"
            return None
        # Noise-aware: a sustained rise (the median of the last `window` grad norms), not one spike.
        self.grad_norm_recent.append(grad_norm)
        del self.grad_norm_recent[: -self.window]
        if len(self.grad_norm_recent) < self.window:
            return None
        median = statistics.median(self.grad_norm_recent)
        if median > self.grad_norm_threshold:
            self.grad_norm_recent = []
            return (
                f"grad_norm median {median:.4g} over {self.window} decisions "
                f"> grad_norm_threshold {self.grad_norm_threshold:.4g}"
            )
        return None

    def decide(
        self, metrics: Mapping[str, float], step: int, groups: Sequence[GroupState]
    ) -> list[HParamUpdate]:
        current = self._require(metrics, self.monitor, step, f"monitor={self.monitor!r}")
        wd_reason = self._grad_norm_reason(metrics, step)
        best_before = self.best
        updates: list[HParamUpdate] = []
        if self._track_best(current):
            reason = (
                f"plateau: {self.monitor}={current:.6g} not better than best={best_before:.6g} "
                f"for {self.num_bad_decisions} decisions (patience={self.patience})"
            )
            if self.noise_aware:
                reason += f"; noise-aware: {self.last_detail}"
            updates += self._cut_lr(groups, reason)
            self._after_cut()
        if wd_reason is not None:
            updates += self._raise_weight_decay(groups, wd_reason)
        return updates

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(patience={self.patience}, lr_factor={self.lr_factor}, "
            f"threshold={self.threshold}, cooldown={self.cooldown}, monitor={self.monitor!r}, "
            f"grad_norm_threshold={self.grad_norm_threshold}, update_frequency={self.update_frequency})"
        )


class AdvancedPlateauMetaOptimizer(PlateauMetaOptimizer):
    """Plateau strategy with warmup, several plateau criteria and overfitting monitoring.

    **Warmup** (``warmup_steps`` > 0): no cut, weight-decay change, best-value or trend tracking
    happens before step ``warmup_steps``. Regular decisions keep their grid (steps
    ``update_frequency - 1``, ``2 * update_frequency - 1``, ...): the first one after warmup is
    the first grid step at or after ``warmup_steps``. The warmup is in *steps* (the only setting
    here that is). By default (``warmup_start_factor=1``) it is only that grace period: the lr is
    not touched and no metric is read before the first decision. With ``warmup_start_factor`` =
    ``f < 1`` it also ramps the lr: every step below ``warmup_steps`` is a decision step that only
    sets each selected group's lr to ``initial_lr * (f + (1 - f) * step / warmup_steps)``
    (torch's ``LinearLR`` ramp), and step ``warmup_steps`` restores ``initial_lr``; these steps
    need no metric (the wrapper still reads the reported ones: on a GPU, one host sync per
    warmup step).

    The default was a ramp from ``f = 0.1``. In a plain per-step loop (AdamW, about 300 steps,
    ``benchmarks/seed_usage.py``) the seed's ``warmup_steps=50`` ramp alone ended at x1.04
    (regression) and x1.04 (digits) the unwrapped optimizer's final loss, x1.02 with ``f = 0.5``,
    and the grace period at x1.000 (development seeds 0-9). Ask for the ramp with
    ``warmup_start_factor=0.1`` where warmup helps (large-batch or transformer training), or use
    ``torch.optim.lr_scheduler.LinearLR`` through ``OptimizerWrapper.attach_scheduler``.

    **Plateau criteria**, evaluated at each decision after warmup, over the monitored metric:

    - ``"no_improvement"``: more than ``patience`` decisions without beating the best value by
      ``threshold`` (exactly :class:`PlateauMetaOptimizer`'s rule);
    - ``"trend"``: once ``trend_window`` values have been seen since the last cut, the relative
      least-squares slope over them (:func:`relative_slope`) is ``>= -trend_threshold``: the
      metric is flat or rising (``mode="max"``: flat or falling);
    - ``"rel_change"`` (when ``rel_change_threshold`` is set): once ``2 * trend_window`` values
      have been seen since the last cut, the mean of the last ``trend_window`` improved on the mean
      of the ``trend_window`` before by less than ``rel_change_threshold`` (relative to it).

    ``criteria="all"`` (default) cuts when every enabled criterion fires (the trend confirms that
    a stall of the best value is not a lucky outlier); ``"any"`` cuts when one fires. The
    decision's ``reason`` lists the criteria that fired. After a cut the trend history restarts
    and ``cooldown`` decisions make no further cut.

    **Overfitting**: when ``val_loss`` and ``loss`` are both in the metrics, the gap
    ``val_loss - loss`` is tracked; if its least-squares slope over the last ``trend_window``
    such decisions, relative to the mean ``|val_loss|``, exceeds ``gap_threshold`` per decision
    (a constant gap never fires), ``overfit_action`` is taken (raise weight decay, cut lr outside
    cooldown, or both) and the gap history restarts.
    With ``weight_norm_threshold`` set, the ``weight_norm`` metric is required and a relative
    slope above it over ``trend_window`` decisions raises weight decay (history restarts).
    Weight decay is raised at most once per decision, whatever the number of triggers
    (grad norm, gap, weight norm); the reason names every trigger.

    Args:
        patience, lr_factor: as in :class:`PlateauMetaOptimizer`.
        warmup_steps: steps before the first plateau decision, and of the lr ramp when
            ``warmup_start_factor < 1`` (>= 0).
        warmup_start_factor: lr at step 0 as a fraction of the initial lr, in [0, 1]; 1 (default):
            no ramp.
        trend_window: decisions in the trend fit (>= 2), also used for the gap and weight norm.
        trend_threshold: the trend criterion fires when the relative slope is ``>=
            -trend_threshold`` (>= 0; 0 means "not falling at all").
        rel_change_threshold: enables the ``"rel_change"`` criterion (>= 0; ``None``: off).
        criteria: ``"all"`` or ``"any"`` of the enabled plateau criteria.
        gap_threshold: gap slope per decision, as a fraction of ``val_loss``, above which the gap
            counts as widening
            (>= 0; ``None`` turns gap monitoring off).
        overfit_action: ``"weight_decay"``, ``"lr"`` or ``"both"`` on a widening gap.
        weight_norm_threshold: relative weight-norm slope per decision that raises weight decay
            (>= 0; ``None``: off).
        **plateau_args: the other arguments of :class:`PlateauMetaOptimizer` (``threshold``,
            ``threshold_mode``, ``cooldown``, ``mode``, ``monitor``, ``eps``, the grad-norm weight
            decay ones, ``groups``, the noise-aware ones) and of :class:`~ray_metaopt.MetaOptimizer`
            (``update_frequency``, ``min_lr``, ``max_lr``, ``max_weight_decay``, ``adaptive_frequency``).

    Example:
        >>> meta = AdvancedPlateauMetaOptimizer(patience=3, lr_factor=0.5, grad_norm_threshold=10.0,
        ...     weight_decay_factor=1.5, warmup_steps=50, trend_window=5)
    """

    _state_attrs = PlateauMetaOptimizer._state_attrs + (
        "warmup_done",
        "history",
        "gap_history",
        "weight_norm_history",
    )

    def __init__(
        self,
        patience: int = 10,
        lr_factor: float = 0.1,
        *,
        warmup_steps: int = 0,
        warmup_start_factor: float = 1.0,
        trend_window: int = 5,
        trend_threshold: float = 0.0,
        rel_change_threshold: float | None = None,
        criteria: str = "all",
        gap_threshold: float | None = 0.01,
        overfit_action: str = "weight_decay",
        weight_norm_threshold: float | None = None,
        **plateau_args: Any,
    ) -> None:
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        self.warmup_start_factor = check_range("warmup_start_factor", warmup_start_factor, 0.0, 1.0)
        self.trend_window = check_int("trend_window", trend_window, minimum=2)
        self.trend_threshold = check_range("trend_threshold", trend_threshold, 0.0, math.inf, high_open=True)
        if rel_change_threshold is not None:
            rel_change_threshold = check_range(
                "rel_change_threshold", rel_change_threshold, 0.0, math.inf, high_open=True
            )
        self.rel_change_threshold = rel_change_threshold
        self.criteria = check_choice("criteria", criteria, _CRITERIA)
        if gap_threshold is not None:
            gap_threshold = check_range("gap_threshold", gap_threshold, 0.0, math.inf, high_open=True)
        self.gap_threshold = gap_threshold
        self.overfit_action = check_choice("overfit_action", overfit_action, _OVERFIT_ACTIONS)
        if weight_norm_threshold is not None:
            weight_norm_threshold = check_range(
                "weight_norm_threshold", weight_norm_threshold, 0.0, math.inf, high_open=True
            )
        self.weight_norm_threshold = weight_norm_threshold
        super().__init__(patience, lr_factor, **plateau_args)

    def _init_state(self) -> None:
        super()._init_state()
        self.warmup_done = self.warmup_steps == 0
        self.history: list[float] = []
        self.gap_history: list[list[float]] = []  # [val_loss - loss, val_loss] per decision
        self.weight_norm_history: list[float] = []

    # ----------------------------------------------------------------- warmup
    @property
    def ramps(self) -> bool:
        """Whether the warmup ramps the lr (``warmup_start_factor < 1``), not only waits."""
        return self.warmup_start_factor < 1.0

    def should_update(self, step: int) -> bool:
        """Every step while a warmup ramp lasts (a smooth ramp), else on the regular schedule."""
        return (self.ramps and not self.warmup_done) or super().should_update(step)

    def warmup_factor(self, step: int) -> float:
        """The warmup multiplier of the initial lr at ``step`` (1.0 once warmup is over)."""
        if step >= self.warmup_steps:
            return 1.0
        f = self.warmup_start_factor
        return f + (1.0 - f) * step / self.warmup_steps

    def update_hparams(
        self, metrics: Mapping[str, float], step: int, groups: Sequence[GroupState] = ()
    ) -> list[HParamUpdate]:
        if self.warmup_done:
            return super().update_hparams(metrics, step, groups)
        if not self.ramps:  # a grace period: grid steps before warmup_steps decide nothing
            if step < self.warmup_steps:
                return []
            updates = super().update_hparams(metrics, step, groups)  # may raise: nothing changed yet
            self.warmup_done = True
            return updates
        # Warmup decisions only set the ramp lr: they need no metric and leave the regular
        # schedule alone (metrics reported once per epoch need not be there every step).
        if first_non_finite(metrics) is not None:
            return []
        factor = self.warmup_factor(step)
        if step < self.warmup_steps:
            reason = f"warmup: step {step}/{self.warmup_steps}, lr = {factor:.4g} x initial"
        else:
            reason = f"warmup done at step {step}: lr = initial"
        updates = [
            HParamUpdate(g.index, "lr", g.initial_lr * factor, reason)
            for g in groups
            if self.selects(g) and g.lr != g.initial_lr * factor
        ]
        if step < self.warmup_steps:
            return updates
        # Regular decisions keep their grid (every update_frequency steps from step 0), so they
        # come when per-epoch metrics such as val_loss are reported.
        next_step = self.next_update_step
        if next_step < step:
            next_step += -(-(step - next_step) // self.interval) * self.interval
        if next_step == step:  # a regular decision is due now too; it decides on the initial lr
            ramped = [replace(g, lr=g.initial_lr) if self.selects(g) else g for g in groups]
            regular = super().update_hparams(metrics, step, ramped)  # may raise: nothing changed yet
            changed = {u.group for u in regular if u.hparam == "lr"}
            updates = [u for u in updates if u.group not in changed] + regular
        else:
            self.next_update_step = next_step
        self.warmup_done = True
        return updates

    # ----------------------------------------------------------------- criteria
    @property
    def _criteria_window(self) -> int:
        """Values per trend / rel-change window: ``trend_window``, at least ``window`` when noise-aware."""
        return max(self.trend_window, self.window) if self.noise_aware else self.trend_window

    def _trend_fires(self) -> tuple[bool, float]:
        n = self._criteria_window
        window = self.history[-n:]
        if len(window) < n:
            return False, math.nan
        rel = relative_slope(window)
        if self.mode == "max":
            rel = -rel
        if self.noise_aware:
            # Fires unless the fitted slope falls by more than noise_k standard errors.
            t = slope_t(window) * (1.0 if self.mode == "min" else -1.0)
            return rel >= -self.trend_threshold or t >= -self.noise_k, rel
        return rel >= -self.trend_threshold, rel

    def _rel_change_fires(self) -> tuple[bool, float]:
        w = self._criteria_window
        if len(self.history) < 2 * w:
            return False, math.nan
        values = self.history[-2 * w :]
        scale = max(abs(v) for v in values) or 1.0  # scaled sums cannot overflow
        previous = sum(v / scale for v in values[:w]) / w
        last = sum(v / scale for v in values[w:]) / w
        improvement = (previous - last) if self.mode == "min" else (last - previous)
        if previous == 0.0:
            rel = 0.0 if improvement == 0.0 else math.copysign(math.inf, improvement)
        else:
            rel = improvement / abs(previous)
        if self.noise_aware:
            # An improvement within noise_k standard errors of the difference is no improvement.
            se = math.hypot(mean_and_stderr(values[:w])[1], mean_and_stderr(values[w:])[1]) / scale
            if improvement <= self.noise_k * se:
                return True, rel
        return rel < self.rel_change_threshold, rel

    def _push(self, history: list[float], value: float, keep: int) -> None:
        history.append(value)
        del history[:-keep]

    def _overfit_reasons(self, metrics: Mapping[str, float], step: int) -> tuple[str | None, str | None]:
        """(gap reason, weight-norm reason) when those signals fire now."""
        gap_reason = wn_reason = None
        if self.gap_threshold is not None and "val_loss" in metrics and "loss" in metrics:
            val, train = float(metrics["val_loss"]), float(metrics["loss"])
            if math.isfinite(val - train):
                self._push(self.gap_history, [val - train, val], self.trend_window)
            if len(self.gap_history) == self.trend_window:
                gaps = [gap for gap, _ in self.gap_history]
                level_scale = max(abs(v) for _, v in self.gap_history)
                level = (
                    sum(abs(v) / level_scale for _, v in self.gap_history) / self.trend_window
                    if level_scale
                    else 0.0
                )
                widening = slope(gaps) / level_scale / level if level > 0 else 0.0
                if widening > self.gap_threshold:
                    gap_reason = (
                        f"overfitting: train/val gap widening to {gaps[-1]:.4g} "
                        f"(+{widening:.3g} of val_loss per decision > gap_threshold {self.gap_threshold:.3g})"
                    )
                    self.gap_history = []
        if self.weight_norm_threshold is not None:
            norm = self._require(
                metrics, "weight_norm", step, f"weight_norm_threshold={self.weight_norm_threshold:g}"
            )
            self._push(self.weight_norm_history, norm, self.trend_window)
            if len(self.weight_norm_history) == self.trend_window:
                growth = relative_slope(self.weight_norm_history)
                if growth > self.weight_norm_threshold:
                    wn_reason = (
                        f"overfitting: weight_norm growing {growth:.3g} per decision "
                        f"> weight_norm_threshold {self.weight_norm_threshold:.3g}"
                    )
                    self.weight_norm_history = []
        return gap_reason, wn_reason

    def decide(
        self, metrics: Mapping[str, float], step: int, groups: Sequence[GroupState]
    ) -> list[HParamUpdate]:
        current = self._require(metrics, self.monitor, step, f"monitor={self.monitor!r}")
        if self.weight_norm_threshold is not None:
            self._require(
                metrics, "weight_norm", step, f"weight_norm_threshold={self.weight_norm_threshold:g}"
            )
        grad_reason = self._grad_norm_reason(metrics, step)

        updates: list[HParamUpdate] = []
        in_cooldown = self.cooldown_counter > 0
        best_before = self.best
        stalled = self._track_best(current)
        self._push(self.history, current, 2 * self._criteria_window)
        fired = {"no_improvement": stalled}
        details = [f"no improvement on best={best_before:.6g} for {self.num_bad_decisions} decisions"]
        if self.noise_aware:
            details[0] += f" ({self.last_detail})"
        fired["trend"], trend = self._trend_fires()
        details.append(f"trend {trend:+.3g}/decision over {self._criteria_window} decisions")
        if self.rel_change_threshold is not None:
            fired["rel_change"], rel = self._rel_change_fires()
            details.append(f"window-mean improvement {rel:.3g}")
        combine = all if self.criteria == "all" else any
        plateau = not in_cooldown and combine(fired.values())

        gap_reason, wn_reason = self._overfit_reasons(metrics, step)
        cut_reasons = []
        if plateau:
            names = [name for name, on in fired.items() if on]
            text = "; ".join(d for (name, on), d in zip(fired.items(), details) if on)
            cut_reasons.append(f"plateau ({'+'.join(names)}): {self.monitor}={current:.6g}, {text}")
        if gap_reason is not None and self.overfit_action in ("lr", "both") and not in_cooldown:
            cut_reasons.append(gap_reason)
        if cut_reasons:
            updates += self._cut_lr(groups, "; ".join(cut_reasons))
            self._after_cut()
            self.history = []

        wd_reasons = [r for r in (grad_reason, wn_reason) if r is not None]
        if gap_reason is not None and self.overfit_action in ("weight_decay", "both"):
            wd_reasons.append(gap_reason)
        if wd_reasons:
            updates += self._raise_weight_decay(groups, "; ".join(wd_reasons))
        return updates

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(patience={self.patience}, lr_factor={self.lr_factor}, "
            f"grad_norm_threshold={self.grad_norm_threshold}, "
            f"weight_decay_factor={self.weight_decay_factor}, warmup_steps={self.warmup_steps}, "
            f"trend_window={self.trend_window}, criteria={self.criteria!r}, "
            f"update_frequency={self.update_frequency})"
        )
