"""A Tune :class:`~ray.tune.Stopper` for what the meta-optimizers report: divergence and lr at its floor.

:class:`MetaStopper` goes where any Tune stopper goes (``RunConfig(stop=MetaStopper(...))``,
``tune.run(stop=...)``), so it works with every scheduler (FIFO, ASHA, HyperBand, PBT, PB2) and
searcher. Two rules that ordinary schedulers cannot express, because they see one metric:

- **divergence**: the trial reported ``diverged=True`` (the provided trainable does so on a
  non-finite loss), a non-finite training/validation loss, or (optional, ``mode="min"`` only) a
  ``metric`` that blew up to ``divergence_factor`` times its best value;
- **lr at its floor**: every param group's learning rate sits at the meta-optimizer's ``min_lr``
  (``lr_at_floor=True``) and ``metric`` has not improved (in the direction ``mode`` says) for
  ``lr_floor_patience`` reports in a row: the meta-optimizer has nothing left to cut.

When a rule stops a trial, the stopper writes why into the result it was given, under
``stop_reason`` (``"diverged: ..."`` / ``"lr_floor: ..."``). Tune hands a stopper the very result
dict that its loggers and ``Trial.last_result`` then record, so the reason shows in
``progress.csv``, ``result.json`` and ``ResultGrid`` (``result.metrics["stop_reason"]``) and comes
back with ``Tuner.restore``. The provided trainable reports ``stop_reason=""`` while a trial runs
and ``"max_steps"`` / ``"diverged: ..."`` / ``"policy_stop: ..."`` (the RL stop action,
``RLMetaOptimizer(stop_action=True)``) on its own last report.

Metric and mode: a Tune stopper is not told ``TuneConfig``'s metric and mode, so give them here
(default ``val_loss`` / ``min``), or use :class:`~ray_metaopt.tune.MetaAwareScheduler`, which
wraps a scheduler, gets ``TuneConfig(metric=..., mode=...)`` through Tune's
``set_search_properties`` and passes them to its stopper.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.stopper import Stopper

from .._validation import check_choice, check_int, check_range
from ..training.reporter import STOP_REASON_KEY

DEFAULT_METRIC, DEFAULT_MODE = "val_loss", "min"


def _as_float(value: Any) -> float | None:
    """``float(value)`` for numbers (Python, numpy, 0-dim tensors); ``None`` for anything else."""
    if value is None or isinstance(value, (bool, str, bytes, list, dict, tuple)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _flat_get(result: dict[str, Any], key: str) -> Any:
    """``result[key]``, also for a nested result (``{"a": {"b": 1}}`` and key ``"a/b"``)."""
    if key in result:
        return result[key]
    node: Any = result
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


class MetaStopper(Stopper):
    """Stop diverged trials and trials stuck at their lr floor; say why in ``stop_reason``.

    The rules read these result keys (the provided trainable reports all of them; a custom
    trainable can report them with :mod:`ray_metaopt.tune.reporting`): ``diverged`` (bool),
    ``lr_at_floor`` (bool), ``train_loss`` / ``val_loss`` (floats) and ``metric``. A missing key
    disables the rule that needs it for that result.

    Args:
        metric: the metric whose improvement the lr-floor rule tracks; ``None``: the one
            :meth:`set_search_properties` gives (``MetaAwareScheduler`` passes ``TuneConfig``'s),
            else ``"val_loss"``.
        mode: ``"min"`` or ``"max"`` for ``metric``; ``None``: as ``metric``, else ``"min"``.
        stop_on_divergence: stop a trial that reported ``diverged`` or a non-finite loss.
        lr_floor_patience: stop after this many consecutive reports with ``lr_at_floor=True``
            and no improvement of ``metric``; ``None`` disables the rule.
        min_delta: an improvement must beat the best ``metric`` by more than this (absolute).
        divergence_factor: also treat ``metric > divergence_factor * best`` as divergence
            (``None`` disables; must be > 1; only with ``mode="min"`` and a positive best).
        loss_keys: result keys whose non-finite value counts as divergence.
        diverged_key: result key of the trainable's own divergence flag.
        lr_floor_key: result key of the "every lr at its floor" flag.

    Example:
        >>> from ray import tune
        >>> stopper = MetaStopper(metric="val_loss", mode="min", lr_floor_patience=3)
        >>> tuner = tune.Tuner(metaopt_trainable, param_space=space,
        ...                    tune_config=tune.TuneConfig(metric="val_loss", mode="min"),
        ...                    run_config=tune.RunConfig(stop=stopper))
    """

    def __init__(
        self,
        *,
        metric: str | None = None,
        mode: str | None = None,
        stop_on_divergence: bool = True,
        lr_floor_patience: int | None = None,
        min_delta: float = 0.0,
        divergence_factor: float | None = None,
        loss_keys: tuple[str, ...] | list[str] = ("train_loss", "val_loss"),
        diverged_key: str = "diverged",
        lr_floor_key: str = "lr_at_floor",
    ) -> None:
        if not isinstance(stop_on_divergence, bool):
            raise TypeError(f"stop_on_divergence must be a bool, got stop_on_divergence={stop_on_divergence!r}")
        if lr_floor_patience is not None:
            lr_floor_patience = check_int("lr_floor_patience", lr_floor_patience, minimum=1)
        if metric is not None and (not isinstance(metric, str) or not metric):
            raise TypeError(f"metric must be a non-empty str or None, got metric={metric!r}")
        if mode is not None:
            check_choice("mode", mode, ("min", "max"))
        for name, value in (("diverged_key", diverged_key), ("lr_floor_key", lr_floor_key)):
            if not isinstance(value, str) or not value:
                raise TypeError(f"{name} must be a non-empty str, got {name}={value!r}")
        if isinstance(loss_keys, str) or not all(isinstance(k, str) and k for k in loss_keys):
            raise TypeError(f"loss_keys must be a list of non-empty str, got loss_keys={loss_keys!r}")
        if divergence_factor is not None:
            divergence_factor = check_range("divergence_factor", divergence_factor, 1.0, math.inf, low_open=True)
            if mode == "max":
                raise ValueError(
                    f"divergence_factor compares a loss with its best value and needs mode='min', got mode={mode!r}"
                )
        self._metric, self._mode = metric, mode
        self.stop_on_divergence = stop_on_divergence
        self.lr_floor_patience = lr_floor_patience
        self.min_delta = check_range("min_delta", min_delta, 0.0, math.inf, high_open=True)
        self.divergence_factor = divergence_factor
        self.loss_keys = tuple(loss_keys)
        self.diverged_key = diverged_key
        self.lr_floor_key = lr_floor_key
        # trial_id -> {"best": float | None, "floor_reports": int, "reports": int}
        self._tracking: dict[str, dict[str, Any]] = {}
        #: trial_id -> why this stopper stopped it (``"diverged: ..."`` / ``"lr_floor: ..."``).
        self.stopped_trials: dict[str, str] = {}

    # ------------------------------------------------------------ metric and mode
    @property
    def metric(self) -> str:
        return self._metric or DEFAULT_METRIC

    @property
    def mode(self) -> str:
        return self._mode or DEFAULT_MODE

    def set_search_properties(self, metric: str | None, mode: str | None) -> bool:
        """Fill in the metric and mode not given to the constructor (as Tune does for schedulers).

        A mode is taken only for this stopper's own metric (a different explicit ``metric`` here
        keeps its own ``mode``, default ``"min"``). Returns ``True``.
        """
        if mode is not None:
            check_choice("mode", mode, ("min", "max"))
        same_metric = not metric or not self._metric or metric == self._metric
        if mode and not self._mode and same_metric:
            if self.divergence_factor is not None and mode == "max":
                raise ValueError(
                    f"divergence_factor compares a loss with its best value and needs mode='min', got mode={mode!r}"
                )
            self._mode = mode
        if metric and not self._metric:
            self._metric = metric
        return True

    # ------------------------------------------------------------ the rules
    def _track(self, trial_id: str) -> dict[str, Any]:
        return self._tracking.setdefault(trial_id, {"best": None, "floor_reports": 0, "reports": 0})

    def _improves(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value < best - self.min_delta if self.mode == "min" else value > best + self.min_delta

    def stop_reason(self, trial_id: str, result: dict[str, Any]) -> str | None:
        """Update the trial's tracking with ``result``; return why to stop it, or ``None``.

        Public so schedulers and tests can apply the same rules without a Tune run.
        """
        track = self._track(trial_id)
        track["reports"] += 1
        metric = self.metric
        value = _as_float(_flat_get(result, metric))

        if self.stop_on_divergence:
            if bool(_flat_get(result, self.diverged_key)):
                return f"diverged: trial reported {self.diverged_key}=True"
            for key in self.loss_keys:
                loss = _as_float(_flat_get(result, key))
                if loss is not None and not math.isfinite(loss):
                    return f"diverged: {key}={loss}"
            best = track["best"]
            if (
                self.divergence_factor is not None
                and self.mode == "min"
                and value is not None
                and best is not None
                and best > 0
                and value > self.divergence_factor * best
            ):
                return (
                    f"diverged: {metric}={value:.6g} > divergence_factor "
                    f"{self.divergence_factor:g} x best {best:.6g}"
                )

        improved = False
        if value is not None and math.isfinite(value) and self._improves(value, track["best"]):
            track["best"] = value
            improved = True
        if bool(_flat_get(result, self.lr_floor_key)) and not improved:
            track["floor_reports"] += 1
        else:
            track["floor_reports"] = 0
        if self.lr_floor_patience is not None and track["floor_reports"] >= self.lr_floor_patience:
            return (
                f"lr_floor: every lr at its floor with no {metric} improvement ({self.mode}) "
                f"for {track['floor_reports']} reports (best {track['best']})"
            )
        return None

    # ------------------------------------------------------------ Stopper interface
    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if trial_id in self.stopped_trials:
            return True
        reason = self.stop_reason(trial_id, result)
        if reason is None:
            return False
        self.stopped_trials[trial_id] = reason
        self._tracking.pop(trial_id, None)
        if not result.get(STOP_REASON_KEY):  # the trainable's own reason (diverged: ...) is more precise
            result[STOP_REASON_KEY] = reason
        return True

    def stop_all(self) -> bool:
        return False

    def forget(self, trial_id: str) -> None:
        """Drop a trial's improvement tracking (it ended or was removed)."""
        self._tracking.pop(trial_id, None)

    # ------------------------------------------------------------ plain-data state
    def state_dict(self) -> dict[str, Any]:
        return {
            "metric": self._metric,
            "mode": self._mode,
            "tracking": {k: dict(v) for k, v in self._tracking.items()},
            "stopped_trials": dict(self.stopped_trials),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._metric, self._mode = state.get("metric", self._metric), state.get("mode", self._mode)
        self._tracking = {k: dict(v) for k, v in state["tracking"].items()}
        self.stopped_trials = dict(state["stopped_trials"])

    def __repr__(self) -> str:
        return (
            f"MetaStopper(metric={self.metric!r}, mode={self.mode!r}, stop_on_divergence={self.stop_on_divergence}, "
            f"lr_floor_patience={self.lr_floor_patience})"
        )


__all__ = ["DEFAULT_METRIC", "DEFAULT_MODE", "STOP_REASON_KEY", "MetaStopper"]
