"""Runs the suite on Ray Tune, phase by phase, and records every trial's curves.

Phases (each one or more Tune experiments with the provided trainable):

1. ``main``: baselines, heuristics, MoE arms and the RL training episodes (fresh seeds, every
   lr of the grid), all tasks, one experiment: trials run concurrently and actors are reused
   between trials. Each task's episodes learn through one shared policy actor that
   :class:`~ray_metaopt.tune.MetaOptCallback` starts and saves.
2. ``rl_eval``: the saved policy, frozen, on the evaluation seeds (the grid and 0.5x/2x its base
   schedule's tuned lr, which the main phase found); the untrained and state-blind controls at
   that tuned lr; the base schedule alone at 0.5x/2x.
3. ``rl_replay``: the RL arm's average lr-multiplier trajectory at that lr replayed.
4. ``pbt``: per task, population and evaluation seed, one PBT population; the populations of
   one size share one experiment (each under its own PBT scheduler).

Example:
    >>> records, info = run_suite(SUITE_SIZES["quick"], storage_path="/tmp/bench")  # needs ray.init()
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .arms import RL_BASE_ARM, Arm, ArmContext, SuiteSize, arms_for, lrs_for, rl_arm_config, trial_config
from .stats import best_setting, executed_steps, mean_lr_factors

logger = logging.getLogger(__name__)

BENCH_KEY = "_bench"


@dataclass
class TrialRecord:
    """One trial's tag (arm, task, lr, seed), outcome and curves, as plain data.

    ``steps``/``val_loss``/``train_loss``/``lr`` hold one entry per report (evaluation);
    ``lr_changes`` is group 0's lr-multiplier trajectory as ``[from_step, factor]`` from the
    meta-optimizer's decisions, the factor applying to what the base schedule gives (on a constant
    schedule, ``lr / initial lr``); ``order`` is the position in which the trial finished.
    """

    arm: str
    task: str
    lr: float | None
    seed: int
    phase: str
    trial_id: str
    group: str = ""
    status: str = "running"
    steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr_trace: list[float] = field(default_factory=list)
    # with paired_reference: the base schedule's curves at the same seed and steps (else empty)
    reference_train_loss: list[float] = field(default_factory=list)
    reference_val_loss: list[float] = field(default_factory=list)
    lr_changes: list[list[float]] = field(default_factory=list)
    executed: int = 0
    error: str | None = None
    order: int = -1
    eval_interval: int = 1

    @property
    def diverged(self) -> bool:
        return self.status == "diverged"

    @property
    def final_val_loss(self) -> float:
        """The last validation loss; ``inf`` for a diverged, failed or unfinished trial."""
        if self.status != "done" or not self.val_loss or not math.isfinite(self.val_loss[-1]):
            return math.inf
        return float(self.val_loss[-1])

    def to_dict(self) -> dict[str, Any]:
        """Plain data for standard JSON (non-finite floats as ``"nan"``/``"inf"`` strings)."""
        out = asdict(self)
        for key in _FLOAT_LISTS:
            out[key] = [_json_float(v) for v in out[key]]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialRecord:
        data = dict(data)
        for key in _FLOAT_LISTS:
            data[key] = [math.nan if v is None else float(v) for v in data.get(key, [])]
        return cls(**data)


_FLOAT_LISTS = ("val_loss", "train_loss", "lr_trace", "reference_train_loss", "reference_val_loss")


def _json_float(value: float | None) -> float | str | None:
    if value is None:
        return None
    # 7 significant digits: exact enough for every table, and a results.json half the size
    return float(f"{value:.7g}") if math.isfinite(value) else str(value)


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def record_from_trajectory(trajectory: Mapping[str, Any], config: Mapping[str, Any], eval_interval: int) -> TrialRecord:
    """One trial's :class:`TrialRecord` from what :class:`~ray_metaopt.tune.MetaOptCallback`
    recorded of it and its config (the ``BENCH_KEY`` tag says arm, task, lr, seed, phase)."""
    tag = dict(config.get(BENCH_KEY) or {})
    records = [r for r in trajectory.get("records", []) if isinstance(r.get("step"), (int, float))]
    status = {"TERMINATED": "done", "ERROR": "error"}.get(trajectory.get("status"), "running")
    if status == "done" and trajectory.get("diverged"):
        status = "diverged"
    lr_changes: list[list[float]] = []
    for decision in trajectory.get("decisions", []):
        if decision.get("group") == 0 and decision.get("hparam") == "lr" and _float(decision.get("old")) > 0.0:
            # The multiplier on whatever the base schedule gives: chained ratios new/old (on a
            # constant base, lr / initial lr).
            current = lr_changes[-1][1] if lr_changes else 1.0
            lr_changes.append([int(decision["step"]) + 1, current * float(decision["new"]) / float(decision["old"])])
    finished = trajectory.get("finished")
    return TrialRecord(
        arm=str(tag.get("arm", "?")),
        task=str(tag.get("task", config.get("task", "?"))),
        lr=tag.get("lr"),
        seed=int(tag.get("seed", config.get("seed", 0))),
        phase=str(tag.get("phase", "")),
        group=str(tag.get("group", "")),
        trial_id=str(trajectory["trial_id"]),
        status=status,
        steps=[int(r["step"]) for r in records],
        val_loss=[_float(r.get("val_loss")) for r in records],
        train_loss=[_float(r.get("train_loss")) for r in records],
        lr_trace=[_float(r.get("lr")) for r in records],
        reference_train_loss=_curve(records, "reference_train_loss"),
        reference_val_loss=_curve(records, "reference_val_loss"),
        lr_changes=lr_changes,
        executed=executed_steps(trajectory.get("reported_steps", []), eval_interval),
        error=trajectory.get("error"),
        order=-1 if finished is None else int(finished),
        eval_interval=eval_interval,
    )


def _curve(records: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """``key`` of every record (NaN where one lacks it), or ``[]`` when no record has it."""
    return [_float(r.get(key)) for r in records] if any(key in r for r in records) else []


def _trial_name(trial: Any) -> str:
    # Short names: the configs are long, and still placeholders when Tune names the trial.
    return f"bench_{trial.trial_id}"


def grid_space(configs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A Tune ``param_space`` that runs exactly ``configs``, one trial each, in order."""
    from ..tune.search_space import preset_grid

    return preset_grid(dict(enumerate(configs)), "_index")


@dataclass
class Runner:
    """Runs Tune experiments of bench trials on the connected Ray cluster and records them.

    Args:
        size: the suite size (for eval_interval and resources).
        storage_path: Tune's ``storage_path`` (also where the trained policies are saved).
        cpus_per_trial, gpus_per_trial: resources of one trial.
        progress: called with one line of text per finished experiment.
    """

    size: SuiteSize
    storage_path: str
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    progress: Callable[[str], None] = print
    records: list[TrialRecord] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def _resources(self, cpus: float | None = None) -> dict[str, float]:
        resources = {"cpu": self.cpus_per_trial if cpus is None else cpus}
        if self.gpus_per_trial > 0:
            resources["gpu"] = self.gpus_per_trial
        return resources

    def run(
        self,
        name: str,
        param_space: Mapping[str, Any],
        *,
        num_samples: int = 1,
        scheduler: Any = None,
        search_alg: Any = None,
        callbacks: Sequence[Any] = (),
        cpus: float | None = None,
    ) -> list[TrialRecord]:
        """One Tune experiment; returns (and keeps) the records of its trials."""
        from ray import tune

        from ..tune.callbacks import MetaOptCallback
        from ..tune.trainable import trainable_with_resources

        # The experiment's MetaOptCallback (an RL phase's owns the policy actor) records every
        # trial's curves; a plain one where there is none.
        recorder = next((c for c in callbacks if isinstance(c, MetaOptCallback)), None)
        extra = [] if recorder is not None else [recorder := MetaOptCallback()]
        started = time.monotonic()
        tuner = tune.Tuner(
            trainable_with_resources(self._resources(cpus)),
            param_space=dict(param_space),
            tune_config=tune.TuneConfig(
                metric="val_loss",
                mode="min",
                num_samples=num_samples,
                scheduler=scheduler,
                search_alg=search_alg,
                reuse_actors=True,
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=self.storage_path,
                callbacks=[*extra, *callbacks],
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        grid = tuner.fit()
        elapsed = time.monotonic() - started
        self.timings[name] = elapsed
        records = []
        for result in grid:
            # The trial dir is named by _trial_name: an errored trial may have reported nothing.
            trial_id = (result.metrics or {}).get("trial_id") or os.path.basename(result.path).removeprefix("bench_")
            if trial_id not in recorder.trajectories:
                continue
            record = record_from_trajectory(recorder.trajectories[trial_id], result.config, self.size.eval_interval)
            if result.error is not None:
                record.status = "error"
                record.error = record.error or (
                    f"{type(result.error).__name__}: {str(result.error).strip().splitlines()[-1][:300]}"
                )
            records.append(record)
        records.sort(key=lambda r: r.order)
        errors = [r for r in records if r.status == "error"]
        self.progress(
            f"  {name}: {len(records)} trials in {elapsed:.0f}s"
            + (f", {len(errors)} errors (first: {errors[0].arm}: {errors[0].error})" if errors else "")
        )
        self.records.extend(records)
        return records

    # ------------------------------------------------------------------ phases
    def run_grid(self, name: str, configs: Sequence[Mapping[str, Any]], callbacks: Sequence[Any] = ()) -> list[TrialRecord]:
        if not configs:
            return []
        return self.run(name, grid_space(configs), callbacks=callbacks)

    def main_phase(self) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        """Baselines, heuristics, MoE arms, the untrained control and the RL training episodes.

        Each RL task's episodes learn through their own shared policy actor, started and saved
        by a :class:`~ray_metaopt.tune.MetaOptCallback`; they come first in the experiment, so the
        policy sees them in order (seed-major: every lr early and late). Returns the saved
        policies' paths and the actors' final stats, by task.
        """
        import ray

        from ..tune.callbacks import MetaOptCallback

        configs: list[dict[str, Any]] = []
        callbacks: dict[str, Any] = {}
        policies, stats = self._given_policy()
        for task in self.size.rl_tasks:
            if task not in self.size.tasks or task in policies:
                continue
            policy_name = f"bench_{task}_{uuid.uuid4().hex[:8]}"
            callbacks[task] = MetaOptCallback(
                policy_name=policy_name,
                policy_config={**_policy_part(self.size.policy()), "seed": 0},
                policy_save_path=_join(self.storage_path, f"policy_{task}.pt"),
                stats_interval_s=2.0,
                write_interval_s=3600.0,
            )
            for seed in self.size.rl_train_seeds:
                for lr in self.size.train_lrs(seed, task):
                    config = trial_config(_TRAIN_ARM, ArmContext(task, self.size, lr, seed), phase="rl_train")
                    config["meta_config"] = {**config["meta_config"], "shared_policy": policy_name}
                    config["paired_reference"] = self.size.rl_paired_reference
                    configs.append(config)
        for task in self.size.tasks:
            for arm in arms_for(task, self.size):
                if arm.phase != "main":
                    continue
                for lr in lrs_for(arm, task, self.size):
                    for seed in self.size.seeds:
                        configs.append(trial_config(arm, ArmContext(task, self.size, lr, seed)))
        try:
            self.run_grid("main", configs, callbacks=list(callbacks.values()))
        finally:
            for callback in callbacks.values():
                if callback.policy_actor is not None:
                    with contextlib.suppress(Exception):
                        ray.kill(callback.policy_actor)
        for task, callback in callbacks.items():
            stats[task] = {k: v for k, v in (callback.policy_stats or {}).items() if isinstance(v, (int, float, str))}
            if callback.saved_policy_path is None:
                self.notes.append(f"{task}: the trained policy could not be saved; the RL evaluation arms did not run")
            else:
                policies[task] = callback.saved_policy_path
        return policies, stats

    def _given_policy(self) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        """With ``size.rl_policy_path``: that policy for every RL task, and what its file says of it."""
        path = self.size.rl_policy_path
        if path is None:
            return {}, {}
        from ..rl.persistence import load_policy

        state = load_policy(path)
        stats = {
            "policy/version": state.get("version"),
            "policy/updates": state.get("updates"),
            "policy/source": path,
        }
        tasks = [t for t in self.size.rl_tasks if t in self.size.tasks]
        return {t: path for t in tasks}, {t: {k: v for k, v in stats.items() if v is not None} for t in tasks}

    def base_lr(self, task: str) -> float:
        """The tuned lr of the RL base arm on ``task`` (from the main phase), else the default lr."""
        lr = tuned_lr(self.records, task)
        if lr is None:
            self.notes.append(f"{task}: no `{RL_BASE_ARM}` runs, so the RL arms ran at the default lr")
            return self.size.default_lr
        return lr

    def rl_eval_phase(self, policies: Mapping[str, str]) -> list[TrialRecord]:
        configs = []
        for task, path in policies.items():
            base_lr = self.base_lr(task)
            for arm in arms_for(task, self.size):
                if arm.phase != "rl_eval":
                    continue
                for lr in lrs_for(arm, task, self.size, base_lr):
                    for seed in self.size.seeds:
                        configs.append(trial_config(arm, ArmContext(task, self.size, lr, seed, policy_path=path)))
        return self.run_grid("rl_eval", configs)

    def rl_replay_phase(self, tasks: Sequence[str]) -> dict[str, list]:
        """Replay, on each task, the geometric-mean lr-multiplier trajectory of the frozen RL arm at its base's tuned lr."""
        schedules: dict[str, list] = {}
        configs = []
        for task in tasks:
            base_lr = self.base_lr(task)
            runs = [
                r for r in self.records
                if r.task == task and r.arm == "rl" and r.lr is not None and math.isclose(r.lr, base_lr)
                and r.status == "done"
            ]
            if not runs:
                self.notes.append(f"{task}: no finished RL run at lr {base_lr:.3g}, so no replay control")
                continue
            schedule = mean_lr_factors([[(int(s), float(f)) for s, f in r.lr_changes] for r in runs])
            schedules[task] = schedule
            for arm in arms_for(task, self.size):
                if arm.phase != "rl_replay":
                    continue
                for seed in self.size.seeds:
                    ctx = ArmContext(task, self.size, base_lr, seed, replay_schedule=schedule)
                    configs.append(trial_config(arm, ctx))
        self.run_grid("rl_replay", configs)
        return schedules

    def pbt_phase(self, total_cpus: float) -> list[TrialRecord]:
        """Every PBT population (one per arm, task and seed): one Tune experiment per population
        size, each population under its own :class:`~ray.tune.schedulers.PopulationBasedTraining`
        (a :class:`~ray_metaopt.tune.grouped_scheduler.GroupedScheduler` keeps them apart), so
        trial workers start once per size instead of once per population."""
        import functools

        import numpy as np

        from ..tune.grouped_scheduler import GroupedScheduler

        low, high = min(self.size.lr_grid), max(self.size.lr_grid)
        by_population: dict[int, list[dict[str, Any]]] = {}
        for task in self.size.tasks:
            for arm in arms_for(task, self.size):
                if arm.phase != "pbt":
                    continue
                for seed in self.size.pbt_seeds or self.size.seeds:
                    config = trial_config(arm, ArmContext(task, self.size, low, seed))
                    # PBT needs a checkpoint at every perturbation; Ray's defaults otherwise.
                    config["checkpoint_interval"] = self.size.pbt_perturbation_evals
                    config[BENCH_KEY] = {**config[BENCH_KEY], "lr": None, "group": f"{arm.name}/{task}/{seed}"}
                    # Initial lrs log-uniform over the grid's range, drawn from the seed alone.
                    draws = np.random.default_rng(seed).uniform(math.log(low), math.log(high), arm.population)
                    for log_lr in draws:
                        by_population.setdefault(arm.population, []).append(
                            {**config, "optimizer_config": {**config["optimizer_config"], "lr": float(math.exp(log_lr))}}
                        )
        out = []
        for population, configs in by_population.items():
            scheduler = GroupedScheduler(
                functools.partial(_population_based_training, self.size.pbt_perturbation_evals, low, high),
                f"{BENCH_KEY}/group",
            )
            # Each population trains at once, as PBT is meant to run.
            cpus = min(self.cpus_per_trial, max(total_cpus, 1.0) / population)
            out += self.run(f"pbt{population}", grid_space(configs), scheduler=scheduler, cpus=cpus)
        return out


def _population_based_training(perturbation_evals: int, low: float, high: float, group: Any = None) -> Any:
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    return PopulationBasedTraining(
        time_attr="training_iteration",
        perturbation_interval=perturbation_evals,
        hyperparam_mutations={"optimizer_config": {"lr": tune.loguniform(low, high)}},
    )


def _policy_part(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings the shared actor owns (:class:`~ray_metaopt.rl.PolicyConfig` fields); the
    rest (``val_weight``, ``reward_clip``, ...) act in the trials only."""
    from ..rl.policy import PolicyConfig

    names = PolicyConfig.field_names()
    return {k: v for k, v in settings.items() if k in names}


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if "://" in base else os.path.join(base, name)


_TRAIN_ARM = Arm(
    "rl_train",
    "rl",
    "RL training episode (shared policy, learning)",
    "sweep",
    "rl_train",
    rl_arm_config,
)


def tuned_lr(records: Sequence[TrialRecord], task: str, arm: str = RL_BASE_ARM) -> float | None:
    """The lr where ``arm`` has the lowest median final val loss on ``task`` (``None``: no runs).

    Example:
        >>> tuned_lr(runner.records, "teacher_student")  # the RL base schedule's tuned lr
        0.0178
    """
    by_lr: dict[float, list[float]] = {}
    for r in records:
        if r.task == task and r.arm == arm and r.lr is not None:
            by_lr.setdefault(float(r.lr), []).append(r.final_val_loss)
    return best_setting(by_lr) if by_lr else None


@dataclass
class SuiteRun:
    """Everything a finished run produced: records, per-phase wall times, RL artefacts, notes."""

    records: list[TrialRecord]
    timings: dict[str, float]
    policy_stats: dict[str, dict[str, Any]]
    replay_schedules: dict[str, list]
    notes: list[str]
    wall_seconds: float


def run_suite(
    size: SuiteSize,
    *,
    storage_path: str,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
    progress: Callable[[str], None] = print,
) -> SuiteRun:
    """Run every phase of the suite on the Ray cluster this process is connected to."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("run_suite needs a connected Ray (ray.init) first")
    started = time.monotonic()
    total_cpus = float(ray.cluster_resources().get("CPU", 1.0))
    runner = Runner(size, storage_path, cpus_per_trial, gpus_per_trial, progress)
    rl_tasks = [t for t in size.rl_tasks if t in size.tasks]
    progress(
        f"phase main: baselines, heuristics, MoE arms ({', '.join(size.tasks)})"
        + (
            f" and the RL training episodes ({', '.join(rl_tasks)})"
            if rl_tasks and size.rl_policy_path is None
            else ""
        )
    )
    policies, policy_stats = runner.main_phase()
    schedules: dict[str, list] = {}
    if policies:
        progress("phase rl_eval: frozen policy, untrained and state-blind controls, base schedule near its tuned lr")
        runner.rl_eval_phase(policies)
        progress("phase rl_replay: the RL arm's average lr-multiplier trajectory replayed")
        schedules = runner.rl_replay_phase(list(policies))
    if any(task in size.tasks for task in size.pbt_tasks) and size.pbt_populations:
        progress(f"phase pbt: populations {list(size.pbt_populations)}, {len(size.pbt_seeds or size.seeds)} seeds each")
        runner.pbt_phase(total_cpus)
    return SuiteRun(
        records=runner.records,
        timings=runner.timings,
        policy_stats=policy_stats,
        replay_schedules=schedules,
        notes=runner.notes,
        wall_seconds=time.monotonic() - started,
    )
