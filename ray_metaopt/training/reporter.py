"""The result dict of one report: a trial's numbers plus the wrapped optimizer's hyperparameters.

:class:`MetricsReporter` builds it (the provided trainable's reports and :func:`~ray_metaopt.tune.report_metrics`);
its plain-data state goes into checkpoints, so a resumed trial continues ``best_val_loss`` and
``meta/decisions`` where it stopped.
"""

from __future__ import annotations

import math
import time
import weakref
from typing import Any, Mapping, Sequence

import torch

from ..metrics import to_float
from ..wrapper import OptimizerWrapper

# Why a trial ended ("" while it runs): the trainable, MetaStopper and MetaAwareScheduler write it.
STOP_REASON_KEY = "stop_reason"


def group_labels(param_groups: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each group's label in metric names: its ``name``, or its index when it has none (or shares it)."""
    names = [str(g.get("name") or "") for g in param_groups]
    return [n if n and names.count(n) == 1 else str(i) for i, n in enumerate(names)]


def hparam_metrics(wrapper: OptimizerWrapper) -> dict[str, Any]:
    """``lr`` (group 0), ``lr/<group>``, ``weight_decay/<group>`` and ``lr_at_floor``.

    ``<group>`` is the group's ``name``, or its index when it has none. ``lr_at_floor`` is true
    when every group's lr is at (or below) its lower bound in the meta-optimizer (``min_lr``).
    """
    out: dict[str, Any] = {}
    at_floor = True
    for state, label in zip(wrapper.group_states(), group_labels(wrapper.param_groups)):
        out[f"lr/{label}"] = state.lr
        if state.weight_decay is not None:
            out[f"weight_decay/{label}"] = state.weight_decay
        low, _ = wrapper.meta_optimizer.lr_bounds(state)
        at_floor = at_floor and state.lr <= low * (1 + 1e-9)
    out["lr"] = to_float(wrapper.param_groups[0]["lr"]) if wrapper.param_groups else math.nan
    out["lr_at_floor"] = bool(at_floor and wrapper.param_groups)
    return out


class MetricsReporter:
    """Builds the result dict of one report: the trial's numbers plus the wrapper's hyperparameters.

    Keeps what a result needs across reports (best validation loss, decisions already reported,
    time and step of the last report); :meth:`state_dict` goes into checkpoints so a resumed trial
    continues ``best_val_loss`` and ``meta/decisions`` where it stopped.

    Args:
        wrapper: the optimizer wrapper whose hyperparameters and decisions to report.
        prefix: namespace of task-specific extras (``"moe"`` -> ``moe/routing_entropy``).
        constants: task facts reported with every result (under ``prefix``).

    Example:
        >>> reporter = MetricsReporter(wrapper, prefix="digits")
        >>> result = reporter.metrics(step=100, train_loss=0.3, val_loss=0.4, extras={"val_accuracy": 0.9})
        >>> result["best_val_loss"], result["digits/val_accuracy"]
        (0.4, 0.9)
    """

    def __init__(
        self,
        wrapper: OptimizerWrapper,
        *,
        prefix: str | None = None,
        constants: Mapping[str, float] | None = None,
    ) -> None:
        if not isinstance(wrapper, OptimizerWrapper):
            raise TypeError(f"wrapper must be an OptimizerWrapper, got wrapper={wrapper!r}")
        self.wrapper = wrapper
        self.prefix = prefix
        self.constants = dict(constants or {})
        self.best_val_loss = math.inf
        self.reported_decisions = 0  # the first report lists every decision made before it
        self._last_time: float | None = None
        self._last_step: int | None = None

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def metrics(
        self,
        *,
        step: int,
        train_loss: float,
        val_loss: float,
        extras: Mapping[str, Any] | None = None,
        diverged: bool | None = None,
    ) -> dict[str, Any]:
        """The result dict for a report at ``step`` (call once per report: it advances the counters).

        ``diverged`` defaults to "``train_loss`` or ``val_loss`` is not finite".
        """
        train_loss, val_loss = to_float(train_loss), to_float(val_loss)
        if diverged is None:
            diverged = not (math.isfinite(train_loss) and math.isfinite(val_loss))
        if math.isfinite(val_loss):
            self.best_val_loss = min(self.best_val_loss, val_loss)
        now = time.perf_counter()
        if self._last_time is not None and self._last_step is not None and now > self._last_time:
            steps_per_second = (step - self._last_step) / (now - self._last_time)
        else:
            steps_per_second = math.nan
        self._last_time, self._last_step = now, step

        log = self.wrapper.log
        new = log.num_decisions - self.reported_decisions
        recent = list(log)[-new:] if new > 0 else []
        self.reported_decisions = log.num_decisions

        result: dict[str, Any] = {
            "step": int(step),
            "train_loss": train_loss,
            "val_loss": val_loss,
            "best_val_loss": self.best_val_loss,
            "diverged": bool(diverged),
            "steps_per_second": steps_per_second,
            "meta/strategy": type(self.wrapper.meta_optimizer).__name__,
            "meta/num_decisions": log.num_decisions,
            "meta/num_skipped": log.num_skipped,
            "meta/decisions": [d.to_dict() for d in recent],
        }
        result.update(hparam_metrics(self.wrapper))
        for key, value in {**self.constants, **dict(extras or {})}.items():
            result[self._key(key)] = to_float(value) if isinstance(value, (torch.Tensor, float, int)) else value
        return result

    def restart_timer(self, step: int | None = None) -> None:
        """Measure the next ``steps_per_second`` from now and ``step`` (``None``: report NaN next).

        Call it when training (re)starts, so a restore's or a start-up's time is not counted.
        """
        self._last_time = time.perf_counter() if step is not None else None
        self._last_step = step

    def state_dict(self) -> dict[str, Any]:
        return {"best_val_loss": self.best_val_loss, "reported_decisions": self.reported_decisions}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_val_loss = float(state["best_val_loss"])
        self.reported_decisions = int(state["reported_decisions"])
        self.restart_timer()


_REPORTERS: "weakref.WeakKeyDictionary[OptimizerWrapper, MetricsReporter]" = weakref.WeakKeyDictionary()


def reporter_for(wrapper: OptimizerWrapper, *, prefix: str | None = None) -> MetricsReporter:
    """The :class:`MetricsReporter` that :func:`~ray_metaopt.tune.report_metrics` keeps for ``wrapper`` (made on first use).

    The function-style helpers (:func:`~ray_metaopt.training.wrap_optimizer`,
    :func:`~ray_metaopt.tune.report_metrics`, :func:`~ray_metaopt.tune.restore_from_tune`) need a reporter that lives as long as the wrapper without the caller
    holding it; a caller that holds its own passes it as ``reporter=`` instead.
    :func:`~ray_metaopt.training.save_checkpoint` never reads this map.
    """
    reporter = _REPORTERS.get(wrapper)
    if reporter is None:
        reporter = _REPORTERS[wrapper] = MetricsReporter(wrapper, prefix=prefix)
    return reporter


__all__ = ["STOP_REASON_KEY", "MetricsReporter", "group_labels", "hparam_metrics", "reporter_for"]
