"""What the benchmark runs: the suite sizes and the arms table.

An *arm* is one way of handling the learning rate (a baseline, a heuristic meta-optimizer, PBT,
the RL policy or one of its controls), written as the provided trainable's config. Every arm
runs on the same tasks with the same evaluation seeds (paired), and with one of three lr plans:

- ``"tune"``: every lr of the grid; reported at the grid's best lr, costing the whole grid;
- ``"sweep"``: every lr of the grid too, reported at the default lr, the others measure
  robustness to the initial lr;
- ``"default"``: the default lr (the grid's centre) only;
- ``"rl"`` (the trained RL policy): every lr of the grid plus 0.5x and 2x the tuned lr of its
  base schedule (:data:`RL_BASE_ARM`), reported at that tuned lr;
- ``"base"`` (the RL controls): the base schedule's tuned lr only;
- ``"rl_near"`` (the base schedule alone): 0.5x and 2x that tuned lr, so that the RL policy is
  compared with its own base at 0.5x, 1x and 2x the tuned lr.

The RL arms run on the base schedule :data:`RL_BASE_SCHEDULE` (anchored actions multiply what it
gives at each step, SOLAR's protocol); their "own base" is the arm :data:`RL_BASE_ARM`, the same
schedule without a policy. The ``"base"`` and ``"rl_near"`` plans need that arm's tuned lr, known
once the main phase is done, so those arms run in the ``rl_eval`` phase.

Example:
    >>> size = SUITE_SIZES["quick"]
    >>> [a.name for a in arms_for("moe", size)][:3]
    ['fixed', 'cosine', 'reduce_on_plateau']
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from .._validation import check_choice, check_int
from ..registry import PresetContext, StrategySpec, preset_strategies, strategy_spec
from .stats import log_grid

STRATEGIES_MODULE = "ray_metaopt.bench.strategies"

# The benchmark's RL policy: lr actions only (weight decay is not what the suite measures), a
# policy learning rate that can move in tens of episodes, the default network and keep prior, the
# learned value baseline (the training episodes span a 1000x range of initial lrs), and returns
# that reach the end of the run undiscounted (gamma 1, horizon beyond any run's decisions): with
# the paired-reference reward an episode's rewards sum to its log-loss ratio to the base schedule,
# so a decision's return is its share of that final ratio (measured against gamma 0.9 over 20
# decisions: benchmarks/RESULTS.md, issue 10, 2026-12-03).
# The schedule the RL arms act on, and the arm that runs it alone (the RL policy's own base).
# The policy multiplies the base at each decision; untrained it reproduces the base exactly, so
# the tuned baseline is where it starts, not what it has to rediscover (SOLAR anchors its
# controller to the tuned cosine schedule the same way).
RL_BASE_SCHEDULE = "cosine"
RL_BASE_ARM = "cosine"
# 0.5x and 2x the base's tuned lr: where the policy must also beat its base (issue 10).
RL_NEAR_FACTORS = (0.5, 2.0)

# How the RL training episodes pick their initial lrs (SuiteSize.rl_train_lrs).
RL_TRAIN_LRS = ("grid", "stratified", "dense", "reference")

# The tuned cosine lr of each quick-size task: the grid lr with the best median final loss over
# evaluation seeds 0-4 in `benchmarks/quick_full` (ray-metaopt bench --quick, 2026-12-03 and
# again 2026-12-08). Training lrs of `train-policy` and of rl_train_lrs="reference" are spread
# around these (REFERENCE_LR_FACTORS); no evaluation run reads them.
REFERENCE_LRS: dict[str, float] = {
    "teacher_student": 0.0178,
    "moe": 0.1,
    "charlm": 0.00316,
    "mnist1d": 0.0178,
}
REFERENCE_LR_FACTORS = (0.3, 0.55, 1.0, 1.8, 3.0)

RL_POLICY: dict[str, Any] = {
    "lr_actions": [0.5, 1.0, 2.0],
    "wd_actions": None,
    "policy_lr": 3e-3,
    "entropy_weight": 0.01,
    "hidden_size": 32,
    "initial_keep_prob": 0.8,
    "batch_size": 16,
    "gamma": 1.0,
    "return_horizon": 1000,
    "baseline": "value",
}


@dataclass(frozen=True)
class SuiteSize:
    """One size of the suite (``quick`` for 2 CPUs, ``full`` for a GPU machine, or a test's).

    Args:
        name: the size's name.
        tasks: task names, in report order.
        task_configs: each task's ``task_config``.
        max_steps: each task's step budget.
        eval_interval: steps between evaluations (and reports).
        batch_size: training batch size; ``batch_sizes``: per-task overrides (:meth:`batch_size_for`).
        seeds: evaluation seeds, the same for every arm (paired).
        lr_grid: initial lrs of the ``tune``/``sweep`` arms (log-spaced over three decades).
        default_lr_index: index in ``lr_grid`` of the lr of the ``default`` arms.
        sweep_tasks: tasks whose adaptive arms run over the whole grid (others: default lr).
        pbt_tasks: tasks PBT runs on; ``pbt_populations``: population sizes.
        pbt_perturbation_evals: PBT's perturbation interval, in evaluations.
        pbt_seeds: seeds of the PBT populations (``None``: ``seeds``), one population each.
        rl_tasks: tasks the RL policy is trained and evaluated on.
        rl_train_seeds: seeds of the training episodes; each runs ``len(lr_grid)`` episodes.
        rl_train_lrs: the initial lrs of a training seed's episodes: ``"grid"``, every lr of
            ``lr_grid``; ``"stratified"``, one lr drawn log-uniformly in each of ``len(lr_grid)``
            equal log-width strata spanning the grid's range (its own draw per seed), so that
            the policy sees initial lrs between the grid's points too; ``"dense"``, every lr of
            the grid and the geometric midpoint of each pair of neighbours (``2 n - 1`` episodes a
            seed, the same lrs for every seed); ``"reference"``, the task's reference tuned lr
            (:data:`REFERENCE_LRS`, found on seeds 0-4) times 0.3, 0.55, 1, 1.8 and 3, as
            ``ray-metaopt train-policy`` trains the shipped policy; see :meth:`train_lrs`.
        rl_policy_path: a saved policy (``save_policy`` / a trained bench policy) that the RL arms
            evaluate instead of training one: no training episodes run, and every RL task is a
            transfer test of that policy (``None``: train a policy per task).
        rl_update_every: steps between RL decisions.
        rl_paired_reference: the training episodes run with ``paired_reference=True`` (each trial
            first runs its base schedule at the same seed; the reward is measured against it;
            twice the training steps, counted in the RL arms' one-time cost).
        rl_policy: overrides of :data:`RL_POLICY` (any ``RLMetaOptimizer`` argument), e.g.
            ``{"gamma": 1.0}``; :meth:`policy` is the policy the RL arms use.
        moe_tasks: tasks that get the MoE arms (router treatments, expert/gate strategies).
        plateau_patience: patience in evaluations of torch's ReduceLROnPlateau and of the
            plateau strategies (``None``: 10% of the evaluations, torch's 10 epochs of a
            100-epoch run).
        gpus_per_trial: GPUs each trial takes when the cluster has some (0 in quick mode).
    """

    name: str
    tasks: tuple[str, ...]
    task_configs: Mapping[str, Mapping[str, Any]]
    max_steps: Mapping[str, int]
    eval_interval: int
    batch_size: int
    seeds: tuple[int, ...]
    lr_grid: tuple[float, ...]
    default_lr_index: int
    sweep_tasks: tuple[str, ...]
    pbt_tasks: tuple[str, ...]
    pbt_populations: tuple[int, ...]
    pbt_perturbation_evals: int
    rl_tasks: tuple[str, ...]
    rl_train_seeds: tuple[int, ...]
    rl_update_every: int
    moe_tasks: tuple[str, ...] = ("moe",)
    rl_paired_reference: bool = False
    rl_train_lrs: str = "grid"
    rl_policy_path: str | None = None
    rl_policy: Mapping[str, Any] = field(default_factory=dict)
    pbt_seeds: tuple[int, ...] | None = None
    plateau_patience: int | None = None
    gpus_per_trial: float = 0.0
    batch_sizes: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_int("eval_interval", self.eval_interval, minimum=1)
        check_int("rl_update_every", self.rl_update_every, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        for task, batch in self.batch_sizes.items():
            check_int(f"batch_sizes[{task!r}]", batch, minimum=1)
        if not self.seeds:
            raise ValueError(f"seeds must not be empty, got seeds={self.seeds!r}")
        if not 0 <= self.default_lr_index < len(self.lr_grid):
            raise ValueError(
                f"default_lr_index must index lr_grid={list(self.lr_grid)}, got default_lr_index={self.default_lr_index}"
            )
        for task in self.tasks:
            if task not in self.max_steps:
                raise ValueError(f"max_steps has no entry for task {task!r}, got max_steps={dict(self.max_steps)}")
        check_choice("rl_train_lrs", self.rl_train_lrs, RL_TRAIN_LRS)
        if self.rl_train_lrs == "reference" and self.rl_policy_path is None:
            unknown = [t for t in self.rl_tasks if t in self.tasks and t not in REFERENCE_LRS]
            if unknown:
                raise ValueError(
                    f"rl_train_lrs='reference' knows the tuned lr of {sorted(REFERENCE_LRS)} only, got rl_tasks "
                    f"{unknown}; pass --rl-tasks among those, or another --rl-train-lrs"
                )
        for seed in self.rl_train_seeds:
            if seed in self.seeds:
                raise ValueError(f"rl_train_seeds must be fresh seeds, not evaluation seeds; {seed} is in both")

    def batch_size_for(self, task: str) -> int:
        return self.batch_sizes.get(task, self.batch_size)

    @property
    def default_lr(self) -> float:
        return self.lr_grid[self.default_lr_index]

    def train_lrs(self, seed: int, task: str | None = None) -> list[float]:
        """The initial lrs of training seed ``seed``'s episodes on ``task``, lowest first (see
        ``rl_train_lrs``; only ``"reference"`` depends on the task).

        Example:
            >>> [round(lr, 5) for lr in SUITE_SIZES["quick"].with_(rl_train_lrs="stratified").train_lrs(100)][:2]
            [0.00012, 0.00075]
        """
        if self.rl_train_lrs == "grid":
            return list(self.lr_grid)
        if self.rl_train_lrs == "reference":
            if task not in REFERENCE_LRS:
                raise ValueError(
                    f"rl_train_lrs='reference' knows the tuned lr of {sorted(REFERENCE_LRS)} only, got task={task!r}"
                )
            return [REFERENCE_LRS[task] * factor for factor in REFERENCE_LR_FACTORS]
        if self.rl_train_lrs == "dense":
            grid = sorted(self.lr_grid)
            mids = [math.sqrt(a * b) for a, b in zip(grid, grid[1:])]
            return sorted(grid + mids)
        low, high = math.log(min(self.lr_grid)), math.log(max(self.lr_grid))
        width = (high - low) / len(self.lr_grid)
        rng = random.Random(seed)  # seed-specific, the same in every run
        return [math.exp(low + (k + rng.random()) * width) for k in range(len(self.lr_grid))]

    def evaluations(self, task: str) -> int:
        return -(-self.max_steps[task] // self.eval_interval)

    def patience(self, task: str) -> int:
        if self.plateau_patience is not None:
            return self.plateau_patience
        return max(1, round(0.1 * self.evaluations(task)))

    def policy(self) -> dict[str, Any]:
        """The RL arms' policy settings: :data:`RL_POLICY` with this size's ``rl_policy`` overrides."""
        return {**RL_POLICY, **self.rl_policy}

    def with_(self, **changes: Any) -> SuiteSize:
        return replace(self, **changes)


GRID = tuple(log_grid(1e-4, 1e-1, 5))

SUITE_SIZES: dict[str, SuiteSize] = {
    # 2 CPUs, about 20 minutes: the whole protocol on teacher_student, charlm and mnist1d (on
    # the last two the adaptive arms run at the default lr only); on moe the tuned baselines,
    # the heuristics over the lr grid and the MoE arms (PBT and RL on moe: full size only).
    "quick": SuiteSize(
        name="quick",
        tasks=("teacher_student", "moe", "charlm", "mnist1d"),
        task_configs={"teacher_student": {}, "moe": {}, "charlm": {"n_embd": 32, "block_size": 32}, "mnist1d": {}},
        max_steps={"teacher_student": 400, "moe": 250, "charlm": 160, "mnist1d": 200},
        eval_interval=20,
        batch_size=64,
        # charlm's step is the suite's costliest (2 layers of attention over 64 windows: ~25 ms on
        # one core); 32 windows of 32 characters halve it and still learn (3.74 bpc for the tuned
        # cosine vs 3.70 at 64, unigram entropy 4.78), keeping the quick suite near 20 minutes
        batch_sizes={"charlm": 32},
        seeds=(0, 1, 2, 3, 4),
        lr_grid=GRID,
        default_lr_index=2,
        sweep_tasks=("teacher_student", "moe"),
        pbt_tasks=("teacher_student", "charlm", "mnist1d"),
        pbt_populations=(4, 8),
        pbt_perturbation_evals=4,
        rl_tasks=("teacher_student", "charlm", "mnist1d"),
        # 12 training seeds x 5 lrs: 60 episodes; with 6 the mnist1d policy got 35 updates and
        # barely moved from its keep prior (benchmarks/RESULTS.md, issue 10)
        rl_train_seeds=tuple(range(100, 112)),
        rl_update_every=10,
        # reward against the base schedule at the same seed (measured: benchmarks/RESULTS.md)
        rl_paired_reference=True,
    ),
    # A GPU machine (or a CPU cluster): every arm on every task, bigger models, 10 seeds.
    "full": SuiteSize(
        name="full",
        tasks=("teacher_student", "moe", "sequence", "digits", "charlm", "mnist1d", "digits_cnn"),
        task_configs={
            "teacher_student": {"scale": 4},
            "moe": {"scale": 4},
            "sequence": {"scale": 2},
            "digits": {},
            # 4 layers, width 128, context 128: ~0.8M parameters, 16k tokens a step at batch 128
            "charlm": {"n_layer": 4, "n_head": 4, "n_embd": 64, "scale": 2, "block_size": 128},
            "mnist1d": {"scale": 2},
            "digits_cnn": {"scale": 2},
        },
        max_steps={
            "teacher_student": 3000, "moe": 3000, "sequence": 3000, "digits": 2000,
            "charlm": 3000, "mnist1d": 3000, "digits_cnn": 2000,
        },
        eval_interval=50,
        batch_size=128,
        seeds=tuple(range(10)),
        lr_grid=GRID,
        default_lr_index=2,
        sweep_tasks=("teacher_student", "moe", "sequence", "digits", "charlm", "mnist1d", "digits_cnn"),
        pbt_tasks=("teacher_student", "moe", "sequence", "digits", "charlm", "mnist1d", "digits_cnn"),
        pbt_populations=(4, 8),
        pbt_perturbation_evals=6,
        rl_tasks=("teacher_student", "moe", "sequence", "digits", "charlm", "mnist1d", "digits_cnn"),
        rl_train_seeds=tuple(range(100, 116)),
        rl_update_every=25,
        rl_paired_reference=True,
        gpus_per_trial=0.25,
    ),
}


@dataclass(frozen=True)
class ArmContext:
    """What an arm's config depends on besides the arm: task, size, lr, seed, RL artefacts."""

    task: str
    size: SuiteSize
    lr: float
    seed: int
    policy_path: str | None = None
    replay_schedule: list | None = None


ConfigFn = Callable[[ArmContext], dict[str, Any]]


@dataclass(frozen=True)
class Arm:
    """One row of the arms table.

    Args:
        name: identifier used in tables, plots and the ``_bench`` tag of trial configs.
        family: ``baseline``, ``heuristic``, ``pbt``, ``rl``, ``rl_control``, ``moe`` or ``optional``.
        description: what the arm is, for the report.
        lr_plan: ``tune``, ``sweep``, ``default``, ``rl``, ``base`` or ``rl_near`` (see module
            doc); ``pbt`` for PBT arms.
        phase: ``main``, ``rl_eval``, ``rl_replay`` or ``pbt``: when it can run (the RL arms
            need the trained policy, the replay needs the RL arm's trajectories).
        config: the trainable config's arm-specific part for an :class:`ArmContext`.
        population: PBT population size.
        needs: a module the arm's optimizer comes from (extra ``bench``); the arm is skipped,
            and says so, where it is not installed.
        tasks: the tasks it is made for (``None``: all), as its strategy's registration says.
    """

    name: str
    family: str
    description: str
    lr_plan: str
    phase: str
    config: ConfigFn = field(compare=False)
    population: int = 0
    needs: str | None = None
    tasks: tuple[str, ...] | None = None

    @property
    def available(self) -> bool:
        return self.needs is None or importlib.util.find_spec(self.needs) is not None


def _strategy(name: str) -> str:
    return f"{STRATEGIES_MODULE}:{name}"


def preset_context(ctx: ArmContext) -> PresetContext:
    """A registered strategy's preset context here: decisions at evaluations, patience scaled to the run."""
    return PresetContext(ctx.size.eval_interval, patience=ctx.size.patience(ctx.task))


def strategy_arm(spec: StrategySpec) -> Arm:
    """The arm of a registered heuristic strategy: its preset settings (the CLI's, with the patience
    scaled to the run); over the lr grid, or at the default lr for one made for some tasks only."""
    return Arm(
        spec.name,
        "heuristic",
        f"{spec.summary}; the CLI's preset settings" if spec.summary else "the CLI's preset settings",
        "sweep" if spec.tasks is None else "default",
        "main",
        lambda ctx: spec.preset_config(preset_context(ctx)),
        tasks=spec.tasks,
    )


def _plateau_config(ctx: ArmContext) -> dict[str, Any]:
    return strategy_spec("plateau").preset_config(preset_context(ctx))["meta_config"]


def _rl_config(ctx: ArmContext, **extra: Any) -> dict[str, Any]:
    return {**ctx.size.policy(), "update_frequency": ctx.size.rl_update_every, **extra}


def rl_arm_config(ctx: ArmContext, meta: str = "rl", **extra: Any) -> dict[str, Any]:
    """An RL arm's trainable config: ``meta`` on the base schedule with the benchmark's policy."""
    return {"meta": meta, "schedule": RL_BASE_SCHEDULE, "meta_config": _rl_config(ctx, **extra)}


def moe_task_accepts(key: str) -> bool:
    """Whether the built-in MoE task takes ``task_config[key]`` (e.g. ``z_loss_weight``)."""
    from ..training.tasks import MoETask

    return key in inspect.signature(MoETask).parameters


def _schedule_free(ctx: ArmContext, **extra: Any) -> dict[str, Any]:
    """Schedule-free AdamW (Defazio et al. 2024) at ``ctx.lr``, with a linear warmup over 5% of the run."""
    warmup = max(1, round(0.05 * ctx.size.max_steps[ctx.task]))
    return {
        "optimizer": "schedulefree:AdamWScheduleFree",
        "optimizer_config": {"lr": ctx.lr, "weight_decay": 1e-4, "warmup_steps": warmup},
        "schedule": "constant",
        **extra,
    }


BASELINE_ARMS: tuple[Arm, ...] = (
    Arm("fixed", "baseline", "AdamW at a constant lr; tuned over the lr grid", "tune", "main",
        lambda ctx: {"meta": "none", "schedule": "constant"}),
    Arm("cosine", "baseline", "AdamW with a cosine decay to 0 over the run; tuned over the lr grid", "tune", "main",
        lambda ctx: {"meta": "none", "schedule": "cosine"}),
    Arm("schedule_free", "baseline",
        "schedule-free AdamW (no lr schedule; 5% linear warmup; evaluated at its averaged weights); "
        "tuned over the lr grid", "tune", "main", lambda ctx: {**_schedule_free(ctx), "meta": "none"},
        needs="schedulefree"),
    Arm("reduce_on_plateau", "baseline",
        "torch ReduceLROnPlateau on val_loss once per evaluation (torch defaults: factor 0.1, threshold 1e-4 rel; "
        "patience in evaluations scaled to the run)", "sweep", "main",
        lambda ctx: {"meta": _strategy("TorchReduceLROnPlateau"), "meta_config": {"patience": ctx.size.patience(ctx.task)}}),
)

SCHEDULE_FREE_PLATEAU_ARM = Arm(
    "schedule_free_plateau", "heuristic",
    "PlateauMetaOptimizer on top of schedule-free AdamW (the plateau arm's settings)", "sweep", "main",
    lambda ctx: _schedule_free(ctx, meta="plateau", meta_config=_plateau_config(ctx)), needs="schedulefree")

RL_ARMS: tuple[Arm, ...] = (
    Arm("rl", "rl",
        f"RL policy on a {RL_BASE_SCHEDULE} base schedule, trained with the shared policy actor, evaluated frozen "
        "(mean readout of its action distribution) on fresh seeds; reported at its base's tuned lr",
        "rl", "rl_eval", lambda ctx: rl_arm_config(ctx, policy_path=ctx.policy_path, frozen=True)),
    Arm("rl_untrained", "rl_control",
        "control: the same RL meta-optimizer with an untrained (initial) policy, frozen (its mean readout is "
        "'keep': the base schedule)",
        "base", "rl_eval", lambda ctx: rl_arm_config(ctx, frozen=True)),
    Arm("rl_state_blind", "rl_control", "control: the trained policy acting on an all-zero state (same network)",
        "base", "rl_eval",
        lambda ctx: rl_arm_config(ctx, _strategy("StateBlindRLMetaOptimizer"), policy_path=ctx.policy_path, frozen=True)),
    Arm("rl_replay", "rl_control",
        "control: replay of the trained policy's average lr multiplier trajectory (geometric mean over seeds) on "
        "the same base schedule",
        "base", "rl_replay",
        lambda ctx: {
            "meta": _strategy("LRReplay"),
            "schedule": RL_BASE_SCHEDULE,
            "meta_config": {"schedule": ctx.replay_schedule or [], "update_frequency": ctx.size.rl_update_every},
        }),
    Arm("rl_base", "rl_control",
        f"the RL policy's base ({RL_BASE_ARM}) alone at {' and '.join(f'{f:g}x' for f in RL_NEAR_FACTORS)} its "
        "tuned lr, off the grid: the reference of the RL arm there",
        "rl_near", "rl_eval", lambda ctx: arm_named(RL_BASE_ARM).config(ctx)),
)



def generic_arms() -> tuple[Arm, ...]:
    """The arms of every task, in report order: baselines, one arm per registered heuristic
    strategy with preset settings (:func:`ray_metaopt.registry.register_strategy`), then the RL arms."""
    return BASELINE_ARMS + _heuristic_arms() + (SCHEDULE_FREE_PLATEAU_ARM,) + RL_ARMS


def _heuristic_arms() -> tuple[Arm, ...]:
    return tuple(strategy_arm(spec) for spec in preset_strategies(family="heuristic"))


def pbt_arm(population: int) -> Arm:
    """Ray Tune PBT with ``population`` members, each trained at the same seed from a sampled lr."""
    population = check_int("population", population, minimum=2)
    return Arm(
        f"pbt{population}",
        "pbt",
        f"Ray Tune PBT, population {population}: lr sampled log-uniformly over the grid's range and mutated "
        "(Ray's defaults otherwise); the best member's final loss, costing the whole population",
        "pbt",
        "pbt",
        lambda ctx: {"meta": "none"},
        population=population,
    )


MOE_ARMS: tuple[Arm, ...] = (
    Arm("moe_no_aux_loss", "moe", "router treatment off: constant lr without the load-balancing loss", "default", "main",
        lambda ctx: {"meta": "none", "task_config": {"balance_weight": 0.0}}),
    Arm("moe_z_loss", "moe", "router treatment: load-balancing loss plus router z-loss (weight 1e-3)", "default", "main",
        lambda ctx: {"meta": "none", "task_config": {"z_loss_weight": 1e-3}}),
)

OPTIONAL_ARM = Arm("lr_free", "optional",
                   "learning-rate-free Prodigy at lr=1.0 with a cosine decay over the run, as its authors recommend",
                   "default", "main",
                   lambda ctx: {
                       "optimizer": "prodigyopt:Prodigy",
                       "optimizer_config": {"lr": ctx.lr, "weight_decay": 1e-4},
                       "meta": "none",
                       "schedule": "cosine",
                   },
                   needs="prodigyopt")

def all_arms() -> tuple[Arm, ...]:
    """Every arm of the table (the registry's heuristics as registered now)."""
    return generic_arms() + (pbt_arm(4), pbt_arm(8)) + MOE_ARMS + (OPTIONAL_ARM,)


def arm_named(name: str) -> Arm | None:
    """The arm called ``name`` (``None``: no such arm)."""
    return next((a for a in all_arms() if a.name == name), None)


def arms_for(task: str, size: SuiteSize) -> list[Arm]:
    """The arms that run on ``task`` at this size, in report order."""
    def runs(arm: Arm) -> bool:
        if arm.family in ("rl", "rl_control") and task not in size.rl_tasks:
            return False
        return arm.available and (arm.tasks is None or task in arm.tasks)

    arms = [a for a in BASELINE_ARMS + _heuristic_arms() + (SCHEDULE_FREE_PLATEAU_ARM,) if runs(a)]
    if task in size.pbt_tasks:
        arms.extend(pbt_arm(p) for p in size.pbt_populations)
    arms.extend(a for a in RL_ARMS if runs(a))
    if task in size.moe_tasks:
        arms.extend(a for a in MOE_ARMS if a.name != "moe_z_loss" or moe_task_accepts("z_loss_weight"))
    if OPTIONAL_ARM.available:
        arms.append(OPTIONAL_ARM)
    return arms


def skipped_arms(task: str, size: SuiteSize) -> list[tuple[str, str]]:
    """``(arm, why)`` for the arms of the table that do not run on ``task`` at this size."""
    running = {a.name for a in arms_for(task, size)}
    out = []
    for arm in all_arms():
        if arm.name in running:
            continue
        if arm.family == "moe" and task not in size.moe_tasks:
            continue  # MoE arms only make sense on MoE tasks: not a gap
        if arm.tasks is not None and task not in arm.tasks:
            continue  # nor a strategy made for other tasks
        if arm.family == "pbt" and task in size.pbt_tasks:
            continue  # this size runs other populations; they are listed in the setup
        if arm.family == "pbt":
            why = f"PBT runs only on {list(size.pbt_tasks)} at the {size.name} size"
        elif arm.family in ("rl", "rl_control"):
            why = f"the RL protocol runs only on {list(size.rl_tasks)} at the {size.name} size"
        elif not arm.available:
            why = f"skipped: `{arm.needs}` is not installed here (`pip install 'ray_metaopt[bench]'`)"
        elif arm.name == "moe_z_loss":
            why = "the MoE task has no z_loss_weight option in this version"
        else:
            why = "not applicable"
        out.append((arm.name, why))
    return out


def rl_near_lrs(base_lr: float) -> list[float]:
    """The off-grid lrs where the RL policy is also compared with its base (0.5x and 2x ``base_lr``)."""
    return [base_lr * f for f in RL_NEAR_FACTORS]


def lrs_for(arm: Arm, task: str, size: SuiteSize, base_lr: float | None = None) -> list[float]:
    """The initial lrs ``arm`` runs at on ``task``.

    ``base_lr`` is the tuned lr of the RL base arm (:data:`RL_BASE_ARM`) on ``task``; the RL
    plans need it (``None``: not known yet, so the default lr stands in, e.g. to count trials).
    """
    if arm.lr_plan == "tune" or (arm.lr_plan == "sweep" and task in size.sweep_tasks):
        return list(size.lr_grid)
    if arm.family == "optional":
        return [1.0]
    base = size.default_lr if base_lr is None else base_lr
    if arm.lr_plan == "rl":
        return list(size.lr_grid) + [lr for lr in rl_near_lrs(base) if not any(_same_lr(lr, g) for g in size.lr_grid)]
    if arm.lr_plan == "base":
        return [base]
    if arm.lr_plan == "rl_near":
        return [lr for lr in rl_near_lrs(base) if not any(_same_lr(lr, g) for g in size.lr_grid)]
    return [size.default_lr]


def _same_lr(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def trial_config(arm: Arm, ctx: ArmContext, *, phase: str | None = None) -> dict[str, Any]:
    """The provided trainable's full config of one trial of ``arm`` (with its ``_bench`` tag)."""
    size = ctx.size
    specific = arm.config(ctx)
    task_config = {**size.task_configs.get(ctx.task, {}), **specific.pop("task_config", {})}
    config: dict[str, Any] = {
        "task": ctx.task,
        "task_config": task_config,
        "optimizer": "adamw",
        "optimizer_config": {"lr": ctx.lr, "weight_decay": 1e-4},
        "max_steps": size.max_steps[ctx.task],
        "eval_interval": size.eval_interval,
        "batch_size": size.batch_size_for(ctx.task),
        "seed": ctx.seed,
        "checkpoint_interval": 0,
        "meta_config": {},
        **specific,
    }
    config["_bench"] = {"arm": arm.name, "task": ctx.task, "lr": ctx.lr, "seed": ctx.seed, "phase": phase or arm.phase}
    return config
