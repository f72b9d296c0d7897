"""A Tune trial scheduler that stops trials using what the meta-optimizers report.

:class:`MetaAwareScheduler` wraps any Tune scheduler (FIFO, ASHA, PBT, ...) and adds two stopping
rules that ordinary schedulers cannot express, because they only see one metric:

- **divergence**: the trial reported ``diverged=True`` (the provided trainable does so on a
  non-finite loss), a non-finite training/validation loss, or (optional) a validation loss that
  blew up to ``divergence_factor`` times its best value;
- **lr at its floor**: every param group's learning rate sits at the meta-optimizer's ``min_lr``
  (``lr_at_floor=True``) and the validation loss has not improved for ``lr_floor_patience``
  reports in a row: the meta-optimizer has nothing left to cut, so the trial is done.

Every other decision, and every other :class:`~ray.tune.schedulers.TrialScheduler` method, is
delegated to the wrapped scheduler (tested with FIFO, ASHA and synchronous PBT under real Tune
runs).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from typing import TYPE_CHECKING, Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from .._validation import check_int, check_range

if TYPE_CHECKING:  # pragma: no cover
    from ray.tune.experiment import Trial

logger = logging.getLogger(__name__)

_BASE_STATE_SUFFIX = ".base"


def _as_float(value: Any) -> float | None:
    """``float(value)`` for numbers (Python, numpy, 0-dim tensors); ``None`` for anything else."""
    if value is None or isinstance(value, (bool, str, bytes, list, dict, tuple)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class MetaAwareScheduler(TrialScheduler):
    """Stop diverged trials and trials stuck at their lr floor; delegate everything else.

    The rules read these result keys (the provided trainable reports all of them; a custom
    trainable can report them with :mod:`ray_metaopt.tune.reporting`): ``diverged`` (bool),
    ``lr_at_floor`` (bool), ``train_loss`` / ``val_loss`` (floats). Missing keys disable the rule
    that needs them for that result; nothing else changes.

    When a rule fires the trial is stopped (``TrialScheduler.STOP``) *before* the wrapped
    scheduler sees that result, and the reason is kept in :attr:`stopped_trials`. Non-finite
    values of the wrapped scheduler's metric are passed on as NaN, which ASHA's rung cutoffs
    (``numpy.nanpercentile``) ignore: a single ``inf`` would otherwise make every cutoff ``-inf``.

    Args:
        base: the scheduler to wrap (``ASHAScheduler(...)``, ``PopulationBasedTraining(...)``,
            ...); ``None`` means ``FIFOScheduler()``.
        stop_on_divergence: stop a trial that reported ``diverged`` or a non-finite loss.
        lr_floor_patience: stop a trial after this many consecutive reports with
            ``lr_at_floor=True`` and no improvement of ``metric``; ``None`` disables the rule.
        stop_on_lr_floor_patience: alias of ``lr_floor_patience`` (give one of them).
        metric: the validation metric whose improvement is tracked (lower is better).
        min_delta: an improvement must lower the best ``metric`` by more than this (absolute).
        divergence_factor: also treat ``metric > divergence_factor * best`` as divergence
            (``None`` disables; must be > 1). Only meaningful for positive losses.
        loss_keys: result keys whose non-finite value counts as divergence.
        diverged_key: result key of the trainable's own divergence flag.
        lr_floor_key: result key of the "every lr at its floor" flag.

    Example:
        >>> from ray import tune
        >>> from ray.tune.schedulers import ASHAScheduler
        >>> scheduler = MetaAwareScheduler(
        ...     ASHAScheduler(time_attr="training_iteration", max_t=20, grace_period=2),
        ...     stop_on_divergence=True, lr_floor_patience=3)
        >>> tune_config = tune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler)
    """

    def __init__(
        self,
        base: TrialScheduler | None = None,
        *,
        stop_on_divergence: bool = True,
        lr_floor_patience: int | None = None,
        stop_on_lr_floor_patience: int | None = None,
        metric: str = "val_loss",
        min_delta: float = 0.0,
        divergence_factor: float | None = None,
        loss_keys: tuple[str, ...] | list[str] = ("train_loss", "val_loss"),
        diverged_key: str = "diverged",
        lr_floor_key: str = "lr_at_floor",
    ) -> None:
        super().__init__()
        if base is None:
            base = FIFOScheduler()
        if not isinstance(base, TrialScheduler):
            raise TypeError(
                f"base must be a ray.tune.schedulers.TrialScheduler, got base={base!r} ({type(base).__name__})"
            )
        if isinstance(base, MetaAwareScheduler):
            raise TypeError("base is already a MetaAwareScheduler; wrap the underlying scheduler once")
        if not isinstance(stop_on_divergence, bool):
            raise TypeError(
                f"stop_on_divergence must be a bool, got stop_on_divergence={stop_on_divergence!r}"
            )
        if lr_floor_patience is not None and stop_on_lr_floor_patience is not None:
            raise ValueError(
                "give lr_floor_patience or its alias stop_on_lr_floor_patience, not both, got "
                f"lr_floor_patience={lr_floor_patience!r}, stop_on_lr_floor_patience={stop_on_lr_floor_patience!r}"
            )
        if stop_on_lr_floor_patience is not None:
            lr_floor_patience = check_int("stop_on_lr_floor_patience", stop_on_lr_floor_patience, minimum=1)
        elif lr_floor_patience is not None:
            lr_floor_patience = check_int("lr_floor_patience", lr_floor_patience, minimum=1)
        for name, value in (
            ("metric", metric),
            ("diverged_key", diverged_key),
            ("lr_floor_key", lr_floor_key),
        ):
            if not isinstance(value, str) or not value:
                raise TypeError(f"{name} must be a non-empty str, got {name}={value!r}")
        if isinstance(loss_keys, str) or not all(isinstance(k, str) and k for k in loss_keys):
            raise TypeError(f"loss_keys must be a list of non-empty str, got loss_keys={loss_keys!r}")
        if divergence_factor is not None:
            divergence_factor = check_range(
                "divergence_factor", divergence_factor, 1.0, math.inf, low_open=True
            )
        self.base = base
        self.stop_on_divergence = stop_on_divergence
        self.lr_floor_patience = lr_floor_patience
        self.improvement_metric = metric
        self.min_delta = check_range("min_delta", min_delta, 0.0, math.inf, high_open=True)
        self.divergence_factor = divergence_factor
        self.loss_keys = tuple(loss_keys)
        self.diverged_key = diverged_key
        self.lr_floor_key = lr_floor_key
        # trial_id -> {"best": float | None, "floor_reports": int, "reports": int}
        self._tracking: dict[str, dict[str, Any]] = {}
        #: trial_id -> why this scheduler stopped it (``"diverged: ..."`` / ``"lr_floor: ..."``).
        self.stopped_trials: dict[str, str] = {}

    # ------------------------------------------------------------ the rules
    def _track(self, trial_id: str) -> dict[str, Any]:
        return self._tracking.setdefault(trial_id, {"best": None, "floor_reports": 0, "reports": 0})

    def stop_reason(self, trial_id: str, result: dict[str, Any]) -> str | None:
        """Update the trial's tracking with ``result``; return why to stop it, or ``None``.

        Public so custom schedulers and tests can apply the same rules without a Tune run.
        """
        track = self._track(trial_id)
        track["reports"] += 1
        value = _as_float(result.get(self.improvement_metric))

        if self.stop_on_divergence:
            if bool(result.get(self.diverged_key, False)):
                return f"diverged: trial reported {self.diverged_key}=True"
            for key in self.loss_keys:
                loss = _as_float(result.get(key))
                if loss is not None and not math.isfinite(loss):
                    return f"diverged: {key}={loss}"
            best = track["best"]
            if (
                self.divergence_factor is not None
                and value is not None
                and best is not None
                and best > 0
                and value > self.divergence_factor * best
            ):
                return (
                    f"diverged: {self.improvement_metric}={value:.6g} > divergence_factor "
                    f"{self.divergence_factor:g} x best {best:.6g}"
                )

        improved = False
        if value is not None and math.isfinite(value):
            best = track["best"]
            if best is None or value < best - self.min_delta:
                track["best"] = value
                improved = True
        if bool(result.get(self.lr_floor_key, False)) and not improved:
            track["floor_reports"] += 1
        else:
            track["floor_reports"] = 0
        if self.lr_floor_patience is not None and track["floor_reports"] >= self.lr_floor_patience:
            return (
                f"lr_floor: every lr at its floor with no {self.improvement_metric} improvement "
                f"for {track['floor_reports']} reports (best {track['best']})"
            )
        return None

    def _for_base(self, result: dict[str, Any]) -> dict[str, Any]:
        """The result as the wrapped scheduler gets it: its metric NaN instead of +-inf."""
        metric = self.base.metric
        if not metric or metric not in result:
            return result
        value = _as_float(result[metric])
        if value is None or math.isfinite(value) or math.isnan(value):
            return result
        sanitized = dict(result)
        sanitized[metric] = float("nan")
        return sanitized

    # ------------------------------------------------------------ TrialScheduler interface
    @property
    def metric(self) -> str | None:
        return self.base.metric

    @property
    def supports_buffered_results(self) -> bool:
        return self.base.supports_buffered_results

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return self.base.set_search_properties(metric, mode, **spec)

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        self._track(trial.trial_id)
        self.base.on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self._tracking.pop(trial.trial_id, None)
        self.base.on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        if trial.trial_id in self.stopped_trials:
            return TrialScheduler.STOP
        reason = self.stop_reason(trial.trial_id, result)
        if reason is not None:
            self.stopped_trials[trial.trial_id] = reason
            logger.warning("MetaAwareScheduler stops trial %s: %s", trial.trial_id, reason)
            return TrialScheduler.STOP
        return self.base.on_trial_result(tune_controller, trial, self._for_base(result))

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> None:
        self._tracking.pop(trial.trial_id, None)
        self.base.on_trial_complete(tune_controller, trial, self._for_base(result))

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self._tracking.pop(trial.trial_id, None)
        self.base.on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        return self.base.choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:
        reasons: dict[str, int] = {}
        for reason in self.stopped_trials.values():
            kind = reason.split(":", 1)[0]
            reasons[kind] = reasons.get(kind, 0) + 1
        counts = ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())) or "none"
        return f"MetaAwareScheduler (stopped: {counts}) over: {self.base.debug_string()}"

    def save(self, checkpoint_path: str) -> None:
        """Save this scheduler's state to ``checkpoint_path`` and the wrapped scheduler's through
        its own ``save`` to ``checkpoint_path + ".base"`` (skipped when it has none, like FIFO)."""
        base_path = checkpoint_path + _BASE_STATE_SUFFIX
        try:
            self.base.save(base_path)
            base_saved = True
        except NotImplementedError:
            base_saved = False
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"state": self.state_dict(), "base_saved": base_saved}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            saved = pickle.load(f)
        self.load_state_dict(saved["state"])
        base_path = checkpoint_path + _BASE_STATE_SUFFIX
        if saved["base_saved"] and os.path.exists(base_path):
            self.base.restore(base_path)

    # ------------------------------------------------------------ plain-data state
    def state_dict(self) -> dict[str, Any]:
        """This scheduler's own state as plain data (the wrapped scheduler is not included)."""
        return {
            "tracking": {k: dict(v) for k, v in self._tracking.items()},
            "stopped_trials": dict(self.stopped_trials),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._tracking = {k: dict(v) for k, v in state["tracking"].items()}
        self.stopped_trials = dict(state["stopped_trials"])

    def __getattr__(self, name: str) -> Any:
        # Scheduler-specific extras (e.g. PBT's attributes) stay reachable through the wrapper.
        if name.startswith("__") or name == "base" or "base" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["base"], name)

    def __repr__(self) -> str:
        return (
            f"MetaAwareScheduler({self.base!r}, stop_on_divergence={self.stop_on_divergence}, "
            f"lr_floor_patience={self.lr_floor_patience})"
        )
