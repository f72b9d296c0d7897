"""Independent populations in one Tune experiment: one scheduler per group of trials.

Tune runs one scheduler per experiment, so N independent PBT populations (one per seed, per task)
take N experiments, and each experiment starts its own trial workers: on a small machine the
worker start-up (importing torch and Ray in every process) costs more than short trials do.
:class:`GroupedScheduler` runs them as one experiment: it routes each trial to the scheduler of
its group (built on first use by a factory) and shows that scheduler only its group's trials, so
each group sees exactly what it would in an experiment of its own (its quantiles, its pauses, its
fair-share choice of the next trial), while workers are reused across groups (``reuse_actors``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Hashable

from ray.tune.schedulers import TrialScheduler

if TYPE_CHECKING:  # pragma: no cover
    from ray.tune.experiment import Trial


class _GroupView:
    """What Tune gives a scheduler (its controller wrapper), with ``get_trials`` and
    ``get_live_trials`` narrowed to one group; every other attribute is the wrapper's."""

    def __init__(self, controller: Any, members: dict[str, Hashable], group: Hashable) -> None:
        self._controller = controller
        self._members = members
        self._group = group

    def _mine(self, trials: list) -> list:
        return [t for t in trials if self._members.get(t.trial_id) == self._group]

    def get_trials(self) -> list:
        return self._mine(self._controller.get_trials())

    def get_live_trials(self) -> list:
        return self._mine(list(self._controller.get_live_trials()))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._controller, name)


class GroupedScheduler(TrialScheduler):
    """One scheduler per group of trials (e.g. a PBT population per seed) in one Tune experiment.

    Each trial's group is ``group_of(trial.config)``; the first trial of a group creates that
    group's scheduler with ``factory(group)``. A group's scheduler sees only its own trials, so
    independent populations never exploit each other. When a worker frees up, the groups are asked
    in the order they first appeared for a trial to run, so a population trains together before the
    next one starts (give the trials of one group together in the param space).

    Args:
        factory: ``group -> TrialScheduler``, a new scheduler per group (picklable: Tuner stores it).
        group_of: ``trial config -> group`` (a hashable value), or the name of a top-level
            config key, or a ``"/"``-separated path of keys into nested dicts.

    Example:
        >>> from functools import partial
        >>> from ray.tune.schedulers import PopulationBasedTraining
        >>> pbt = partial(PopulationBasedTraining, time_attr="training_iteration", perturbation_interval=4,
        ...               hyperparam_mutations={"optimizer_config": {"lr": tune.loguniform(1e-4, 1e-1)}})
        >>> scheduler = GroupedScheduler(lambda group: pbt(), "seed")   # one population per seed
        >>> tune.Tuner(metaopt_trainable, param_space={..., "seed": tune.grid_search([0, 1, 2])},
        ...            tune_config=tune.TuneConfig(metric="val_loss", mode="min", num_samples=4,
        ...                                        scheduler=scheduler, reuse_actors=True))
    """

    def __init__(self, factory: Callable[[Hashable], TrialScheduler], group_of: str | Callable[[dict], Hashable]) -> None:
        super().__init__()
        if not callable(factory):
            raise TypeError(f"factory must be callable (group -> TrialScheduler), got factory={factory!r}")
        if isinstance(group_of, str):
            if not group_of or any(not part for part in group_of.split("/")):
                raise ValueError(f"group_of must name a config key (or a 'a/b' path), got group_of={group_of!r}")
        elif not callable(group_of):
            raise TypeError(f"group_of must be a config key or a callable (config -> group), got group_of={group_of!r}")
        self.factory = factory
        self.group_of = group_of
        self.schedulers: dict[Hashable, TrialScheduler] = {}  # in order of first appearance
        self._members: dict[str, Hashable] = {}  # trial_id -> group
        self._mode: str | None = None

    def _group(self, config: dict) -> Hashable:
        if callable(self.group_of):
            return self.group_of(config)
        value: Any = config
        for part in self.group_of.split("/"):
            if not isinstance(value, dict) or part not in value:
                raise ValueError(f"GroupedScheduler: trial config has no {self.group_of!r} (group_of); keys: {sorted(config)}")
            value = value[part]
        return value

    def _scheduler(self, group: Hashable) -> TrialScheduler:
        scheduler = self.schedulers.get(group)
        if scheduler is None:
            scheduler = self.factory(group)
            if not isinstance(scheduler, TrialScheduler):
                raise TypeError(f"factory({group!r}) must return a TrialScheduler, got {scheduler!r}")
            scheduler.set_search_properties(self._metric, self._mode)
            self.schedulers[group] = scheduler
        return scheduler

    def _route(self, controller: Any, trial: Trial) -> tuple[TrialScheduler, _GroupView]:
        group = self._members[trial.trial_id]
        return self.schedulers[group], _GroupView(controller, self._members, group)

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return all(s.set_search_properties(metric, mode, **spec) for s in self.schedulers.values())

    @property
    def supports_buffered_results(self) -> bool:
        # Known only per group's scheduler: PBT and HyperBand need every result as it comes.
        return False

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        group = self._group(trial.config)
        scheduler = self._scheduler(group)
        self._members[trial.trial_id] = group
        scheduler.on_trial_add(_GroupView(tune_controller, self._members, group), trial)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        scheduler, view = self._route(tune_controller, trial)
        scheduler.on_trial_error(view, trial)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        scheduler, view = self._route(tune_controller, trial)
        return scheduler.on_trial_result(view, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        scheduler, view = self._route(tune_controller, trial)
        scheduler.on_trial_complete(view, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        scheduler, view = self._route(tune_controller, trial)
        scheduler.on_trial_remove(view, trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        for group, scheduler in self.schedulers.items():
            trial = scheduler.choose_trial_to_run(_GroupView(tune_controller, self._members, group))
            if trial is not None:
                return trial
        return None

    def debug_string(self) -> str:
        return f"GroupedScheduler: {len(self.schedulers)} groups" + "".join(
            f"\n  {group}: {scheduler.debug_string()}" for group, scheduler in self.schedulers.items()
        )


__all__ = ["GroupedScheduler"]
