"""A Tune trial scheduler that applies :class:`~ray_metaopt.tune.MetaStopper`'s rules: a thin convenience.

:class:`MetaAwareScheduler` wraps any Tune scheduler (FIFO, ASHA, PBT, ...) and runs a
:class:`~ray_metaopt.tune.stopper.MetaStopper` (divergence, lr at its floor) on every result
before the wrapped scheduler sees it. Prefer the stopper itself (``RunConfig(stop=MetaStopper(...))``):
it works with any scheduler and writes ``stop_reason`` into the very result Tune records. What the
wrapper adds: it gets ``TuneConfig(metric=..., mode=...)`` through Tune's ``set_search_properties``
and passes them on to its stopper and to the wrapped scheduler, it keeps non-finite values of the
wrapped scheduler's metric from reaching it (as NaN), and it records a ``stop_reason`` also for
trials the *wrapped* scheduler stopped (``"scheduler: ASHAScheduler stopped the trial"``).

Every :class:`~ray.tune.schedulers.TrialScheduler` method is delegated to the wrapped scheduler
(tested with FIFO, ASHA and synchronous PBT under real Tune runs).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from typing import TYPE_CHECKING, Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from .._validation import check_int
from .stopper import STOP_REASON_KEY, MetaStopper, _as_float

if TYPE_CHECKING:  # pragma: no cover
    from ray.tune.experiment import Trial

logger = logging.getLogger(__name__)

_BASE_STATE_SUFFIX = ".base"
_STOPPER_ATTRS = (
    "stop_on_divergence", "lr_floor_patience", "min_delta", "divergence_factor", "loss_keys",
    "diverged_key", "lr_floor_key", "mode",
)


class MetaAwareScheduler(TrialScheduler):
    """Stop diverged trials and trials stuck at their lr floor (a :class:`MetaStopper`); delegate the rest.

    When the stopper's rule fires the trial is stopped (``TrialScheduler.STOP``) *before* the
    wrapped scheduler sees that result; the reason is kept in :attr:`stopped_trials` and written
    to the trial's last result as ``stop_reason`` when it completes (so ``ResultGrid`` shows it;
    for ``progress.csv`` to show it too, pass the stopper as ``RunConfig(stop=...)`` instead).
    Non-finite values of the wrapped scheduler's metric are passed on as NaN, which ASHA's rung
    cutoffs (``numpy.nanpercentile``) ignore: a single ``inf`` would otherwise make every cutoff
    ``-inf``.

    Args:
        base: the scheduler to wrap (``ASHAScheduler(...)``, ``PopulationBasedTraining(...)``,
            ...); ``None`` means ``FIFOScheduler()``.
        stop_on_divergence: stop a trial that reported ``diverged`` or a non-finite loss.
        lr_floor_patience: stop a trial after this many consecutive reports with
            ``lr_at_floor=True`` and no improvement of ``metric``; ``None`` disables the rule.
        stop_on_lr_floor_patience: alias of ``lr_floor_patience`` (give one of them).
        metric: the metric whose improvement is tracked; ``None`` (default): ``TuneConfig``'s
            metric, else ``"val_loss"``.
        mode: ``"min"``/``"max"`` for ``metric``; ``None``: ``TuneConfig``'s mode, else ``"min"``.
        min_delta, divergence_factor, loss_keys, diverged_key, lr_floor_key: as in
            :class:`MetaStopper`.
        stopper: a ready :class:`MetaStopper` instead of the rule arguments above.

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
        metric: str | None = None,
        mode: str | None = None,
        min_delta: float = 0.0,
        divergence_factor: float | None = None,
        loss_keys: tuple[str, ...] | list[str] = ("train_loss", "val_loss"),
        diverged_key: str = "diverged",
        lr_floor_key: str = "lr_at_floor",
        stopper: MetaStopper | None = None,
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
        if lr_floor_patience is not None and stop_on_lr_floor_patience is not None:
            raise ValueError(
                "give lr_floor_patience or its alias stop_on_lr_floor_patience, not both, got "
                f"lr_floor_patience={lr_floor_patience!r}, stop_on_lr_floor_patience={stop_on_lr_floor_patience!r}"
            )
        if stop_on_lr_floor_patience is not None:
            lr_floor_patience = check_int("stop_on_lr_floor_patience", stop_on_lr_floor_patience, minimum=1)
        if stopper is not None:
            if not isinstance(stopper, MetaStopper):
                raise TypeError(f"stopper must be a MetaStopper, got stopper={stopper!r}")
        else:
            stopper = MetaStopper(
                metric=metric,
                mode=mode,
                stop_on_divergence=stop_on_divergence,
                lr_floor_patience=lr_floor_patience,
                min_delta=min_delta,
                divergence_factor=divergence_factor,
                loss_keys=loss_keys,
                diverged_key=diverged_key,
                lr_floor_key=lr_floor_key,
            )
        self.base = base
        self.stopper = stopper
        #: trial_id -> why the wrapped scheduler stopped it (``"scheduler: ..."``).
        self._base_stopped: dict[str, str] = {}

    # ------------------------------------------------------------ the rules
    @property
    def stopped_trials(self) -> dict[str, str]:
        """trial_id -> why this scheduler's rules stopped it (``"diverged: ..."`` / ``"lr_floor: ..."``)."""
        return self.stopper.stopped_trials

    def stop_reason(self, trial_id: str, result: dict[str, Any]) -> str | None:
        """The stopper's :meth:`MetaStopper.stop_reason` (kept for custom schedulers and tests)."""
        return self.stopper.stop_reason(trial_id, result)

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

    def _record_reason(self, trial: Trial) -> None:
        """Write why the trial ended into its last result (unless the trial gave its own reason)."""
        reason = self.stopper.stopped_trials.get(trial.trial_id) or self._base_stopped.get(trial.trial_id)
        last = getattr(trial, "last_result", None)
        if reason and isinstance(last, dict) and not last.get(STOP_REASON_KEY):
            last[STOP_REASON_KEY] = reason

    # ------------------------------------------------------------ TrialScheduler interface
    @property
    def metric(self) -> str | None:
        return self.base.metric or self.stopper.metric

    @property
    def supports_buffered_results(self) -> bool:
        return self.base.supports_buffered_results

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        self.stopper.set_search_properties(metric, mode)
        return self.base.set_search_properties(metric, mode, **spec)

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        self.base.on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self.stopper.forget(trial.trial_id)
        self.base.on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        already = trial.trial_id in self.stopper.stopped_trials
        if self.stopper(trial.trial_id, result):
            if not already:
                logger.warning(
                    "MetaAwareScheduler stops trial %s: %s", trial.trial_id, self.stopped_trials[trial.trial_id]
                )
            return TrialScheduler.STOP
        decision = self.base.on_trial_result(tune_controller, trial, self._for_base(result))
        if decision == TrialScheduler.STOP and not result.get("done"):
            self._base_stopped[trial.trial_id] = (
                f"scheduler: {type(self.base).__name__} stopped the trial at "
                f"training_iteration={result.get('training_iteration')}"
            )
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> None:
        self.stopper.forget(trial.trial_id)
        self._record_reason(trial)
        self.base.on_trial_complete(tune_controller, trial, self._for_base(result))

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self.stopper.forget(trial.trial_id)
        self._record_reason(trial)
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
        return {"stopper": self.stopper.state_dict(), "base_stopped": dict(self._base_stopped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stopper.load_state_dict(state["stopper"])
        self._base_stopped = dict(state.get("base_stopped", {}))

    def __getattr__(self, name: str) -> Any:
        # Scheduler-specific extras (e.g. PBT's attributes) stay reachable through the wrapper.
        if name.startswith("__") or name in ("base", "stopper") or "base" not in self.__dict__:
            raise AttributeError(name)
        if name in _STOPPER_ATTRS and "stopper" in self.__dict__:  # the rules' settings
            return getattr(self.__dict__["stopper"], name)
        if name == "improvement_metric" and "stopper" in self.__dict__:
            return self.__dict__["stopper"].metric
        return getattr(self.__dict__["base"], name)

    def __repr__(self) -> str:
        return f"MetaAwareScheduler({self.base!r}, stopper={self.stopper!r})"
