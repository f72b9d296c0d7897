"""From trial records to the numbers of the report: per arm and task, the metrics of the issue.

For every arm on a task: the *headline* setting (the grid's best lr for tuned arms, the RL base
schedule's tuned lr for the RL arm and its controls, the default lr otherwise, the best member
for PBT), its final validation loss over the evaluation seeds
(median and spread), a paired comparison with the tuned cosine and tuned fixed baselines, the
steps to reach the target (the tuned cosine median), the tuning cost in trials x steps, the
divergence rate over all its trials, and, for arms run over the lr grid, their robustness.

Example:
    >>> results = analyze(records, size)  # records: TrialRecord list from run_suite
    >>> results["teacher_student"].arms["cosine"].summary.median
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from .arms import RL_BASE_ARM, Arm, SuiteSize, arm_named, arms_for, pbt_arm
from .runner import TrialRecord, tuned_lr
from .stats import (
    PairedComparison,
    Robustness,
    Summary,
    best_setting,
    episode_return,
    paired_comparison,
    quantile,
    robustness,
    steps_to_target,
    summarize,
)

REFERENCE_ARM = "cosine"  # the tuned cosine schedule: the baseline every arm is compared with


@dataclass
class ArmResult:
    """One arm's numbers on one task (see the module doc)."""

    arm: Arm
    headline_lr: float | None
    finals: dict[int, float]  # seed -> final val loss at the headline setting
    curves: dict[int, TrialRecord]  # seed -> the record behind that final (PBT: the best member)
    summary: Summary | None
    vs_cosine: PairedComparison | None = None
    vs_fixed: PairedComparison | None = None  # against the tuned fixed lr
    vs_fixed_same_lr: PairedComparison | None = None  # against a constant lr equal to its initial lr
    steps_to_target: dict[int, int | None] = field(default_factory=dict)
    cost_trials: int = 0
    cost_steps: float = math.nan  # per final model, median over seeds
    one_time_steps: int = 0  # RL training episodes (shared by every later use of the policy)
    num_trials: int = 0
    num_diverged: int = 0
    num_errors: int = 0
    finals_by_lr: dict[float, dict[int, float]] = field(default_factory=dict)  # every lr it ran at
    robustness: Robustness | None = None

    @property
    def divergence_rate(self) -> float:
        return self.num_diverged / self.num_trials if self.num_trials else math.nan

    @property
    def target_reached(self) -> int:
        return sum(s is not None for s in self.steps_to_target.values())

    @property
    def median_steps_to_target(self) -> float:
        values = [math.inf if s is None else float(s) for s in self.steps_to_target.values()]
        return quantile(values, 0.5) if values else math.nan


@dataclass
class RLResult:
    """The RL policy's training episodes and what they say about learning."""

    episodes: list[TrialRecord]
    returns: list[float]  # in the order the episodes finished
    lrs: list[float]
    baseline_returns: dict[float, float]  # lr -> mean return of the base schedule's runs at that lr
    advantages: list[float]  # return minus the base schedule's return at the episode's lr
    first_round_mean: float  # mean advantage of the first round of training seeds (one episode per lr)
    last_round_mean: float
    first_half_mean: float  # the same over the first / last half of the rounds (less noisy)
    last_half_mean: float
    paired_episodes: int  # episodes whose advantage is against their own paired reference
    vs_base_by_lr: dict[float, PairedComparison | None]  # the RL arm vs its base schedule at each lr
    base_arm: str  # the arm that runs the base schedule alone
    base_lr: float | None  # the base's tuned lr: where the RL arm and its controls are reported
    replay_schedule: list
    policy_stats: dict[str, Any]


@dataclass
class TaskResult:
    task: str
    target: float
    arms: dict[str, ArmResult]
    best_overall: float
    rl: RLResult | None = None


def _select(records: Sequence[TrialRecord], task: str, arm: str, lr: float | None = None) -> list[TrialRecord]:
    return [
        r for r in records
        if r.task == task and r.arm == arm and (lr is None or (r.lr is not None and math.isclose(r.lr, lr)))
    ]


def _has_lr(by_lr: Mapping[float, Any], lr: float) -> float | None:
    """The key of ``by_lr`` equal to ``lr`` up to rounding, else ``None``."""
    return next((k for k in by_lr if math.isclose(k, lr, rel_tol=1e-9)), None)


def _finals_by_lr(records: Sequence[TrialRecord]) -> dict[float, dict[int, float]]:
    out: dict[float, dict[int, float]] = {}
    for r in records:
        if r.lr is not None:
            out.setdefault(float(r.lr), {})[r.seed] = r.final_val_loss
    return out


TUNED_SUFFIX = "_tuned"


def tuned_variant(arm: Arm) -> Arm:
    """A swept arm reported at its grid-best lr instead of the default one (costing the whole grid)."""
    return replace(
        arm,
        name=arm.name + TUNED_SUFFIX,
        lr_plan="tune",
        description=f"{arm.name} at the grid lr where it does best (tuned like the baselines)",
    )


def _arm_result(
    arm: Arm,
    task: str,
    records: Sequence[TrialRecord],
    size: SuiteSize,
    source: str | None = None,
    base_lr: float | None = None,
) -> ArmResult | None:
    """``arm``'s numbers from the records of arm ``source`` (default: its own name).

    ``base_lr``: the RL base arm's tuned lr, where the ``rl``/``base`` lr plans report.
    """
    runs = _select(records, task, source or arm.name)
    if not runs or arm.lr_plan == "rl_near":  # the base off the grid: a reference in the RL section only
        return None
    finals: dict[int, float] = {}
    curves: dict[int, TrialRecord] = {}
    headline: float | None
    by_lr: dict[float, dict[int, float]] = {}
    if arm.family == "pbt":
        headline = None
        by_seed: dict[int, list[TrialRecord]] = {}
        for r in runs:
            by_seed.setdefault(r.seed, []).append(r)
        cost = []
        for seed, members in by_seed.items():
            best = min(members, key=lambda r: r.final_val_loss)
            finals[seed], curves[seed] = best.final_val_loss, best
            cost.append(sum(m.executed for m in members))
        cost_trials = arm.population
    else:
        by_lr = _finals_by_lr(runs)
        if arm.lr_plan == "tune":
            headline = best_setting({lr: list(v.values()) for lr, v in by_lr.items()})
        elif arm.lr_plan in ("rl", "base") and base_lr is not None and _has_lr(by_lr, base_lr):
            headline = _has_lr(by_lr, base_lr)
        elif len(by_lr) == 1:
            headline = next(iter(by_lr))
        else:
            headline = size.default_lr
        finals = dict(by_lr.get(headline, {}))
        curves = {r.seed: r for r in runs if r.lr is not None and math.isclose(r.lr, headline)}
        if arm.lr_plan == "tune":
            cost = [sum(r.executed for r in runs if r.seed == seed) for seed in finals]
            cost_trials = len(by_lr)
        else:
            cost = [curves[s].executed for s in finals]
            cost_trials = 1
    result = ArmResult(
        arm=arm,
        headline_lr=headline,
        finals=finals,
        curves=curves,
        summary=summarize(finals.values()) if finals else None,
        cost_trials=cost_trials,
        cost_steps=quantile([float(c) for c in cost], 0.5) if cost else math.nan,
        num_trials=len(runs),
        num_diverged=sum(r.diverged for r in runs),
        num_errors=sum(r.status == "error" for r in runs),
        # A variant repeats its source's robustness; robustness is over the grid (the RL arm also
        # runs at two lrs off it).
        finals_by_lr={lr: v for lr, v in by_lr.items() if any(math.isclose(lr, g) for g in size.lr_grid)}
        if source is None else {},
    )
    return result


def _reference_return(episode: TrialRecord, val_weight: float) -> float | None:
    """The return of an episode's paired reference (the base schedule at its seed, over the same
    reports), or ``None`` when the episode has none or it is incomplete."""
    train, val = episode.reference_train_loss, episode.reference_val_loss
    if not train or len(train) != len(episode.train_loss) or not val:
        return None
    if not all(math.isfinite(x) for x in (*train, val[0], val[-1])):
        return None
    return episode_return(train, val, val_weight)


def _rl_result(
    task: str, records: Sequence[TrialRecord], size: SuiteSize, schedule: list, stats: Mapping[str, Any]
) -> RLResult | None:
    episodes = sorted(_select(records, task, "rl_train"), key=lambda r: r.order)
    if not episodes and not _select(records, task, "rl"):
        return None
    val_weight = float(size.policy().get("val_weight", 1.0))
    returns = [
        episode_return(e.train_loss, e.val_loss, val_weight) if e.train_loss and e.val_loss else -math.inf
        for e in episodes
    ]
    def mean(values: list[float]) -> float:
        finite = [v for v in values if math.isfinite(v)]
        return sum(finite) / len(finite) if finite else math.nan

    # The return depends mostly on the initial lr; what the policy adds is its return above
    # that of its base schedule alone at the same lr (on the evaluation seeds; off the grid the
    # `rl_base` runs).
    base_runs = _select(records, task, RL_BASE_ARM) + _select(records, task, "rl_base")
    baselines: dict[float, list[float]] = {}
    for r in base_runs:
        if r.lr is not None and r.train_loss and r.val_loss:
            baselines.setdefault(float(r.lr), []).append(episode_return(r.train_loss, r.val_loss, val_weight))
    baseline = {lr: mean(v) for lr, v in baselines.items()}
    # An episode trained with a paired reference carries its base schedule's curves at the
    # same seed: its advantage is paired (no seed noise). Otherwise, the base schedule's mean
    # return at that lr on the evaluation seeds.
    advantages = []
    paired = 0
    for e, ret in zip(episodes, returns):
        ref = _reference_return(e, val_weight)
        if ref is not None:
            paired += 1
            advantages.append(ret - ref)
        else:
            advantages.append(ret - baseline.get(float(e.lr), math.nan))
    # Rounds: each training seed runs every lr once; compare the first and the last round.
    by_seed: dict[int, list[float]] = {}
    for e, adv in zip(episodes, advantages):
        by_seed.setdefault(e.seed, []).append(adv)
    seeds_in_order = sorted(by_seed, key=lambda s: min(e.order for e in episodes if e.seed == s))

    base = _finals_by_lr(base_runs)
    rl = _finals_by_lr(_select(records, task, "rl"))
    vs_base = {lr: paired_comparison(rl[lr], base.get(_has_lr(base, lr), {})) for lr in sorted(rl)}
    return RLResult(
        episodes=episodes,
        returns=returns,
        lrs=[float(e.lr) for e in episodes],
        baseline_returns=baseline,
        advantages=advantages,
        first_round_mean=mean(by_seed[seeds_in_order[0]]) if seeds_in_order else math.nan,
        last_round_mean=mean(by_seed[seeds_in_order[-1]]) if seeds_in_order else math.nan,
        first_half_mean=mean([a for s in seeds_in_order[: len(seeds_in_order) // 2] for a in by_seed[s]]),
        last_half_mean=mean([a for s in seeds_in_order[(len(seeds_in_order) + 1) // 2 :] for a in by_seed[s]]),
        paired_episodes=paired,
        vs_base_by_lr=vs_base,
        base_arm=RL_BASE_ARM,
        base_lr=tuned_lr(records, task),
        replay_schedule=list(schedule or []),
        policy_stats=dict(stats or {}),
    )


def analyze(
    records: Sequence[TrialRecord],
    size: SuiteSize,
    *,
    replay_schedules: Mapping[str, list] | None = None,
    policy_stats: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, TaskResult]:
    """The report's numbers for every task of ``size`` (see the module doc)."""
    out: dict[str, TaskResult] = {}
    for task in size.tasks:
        arms: dict[str, ArmResult] = {}
        base_lr = tuned_lr(records, task)
        for arm in arms_for(task, size):
            result = _arm_result(arm, task, records, size, base_lr=base_lr)
            if result is not None:
                arms[arm.name] = result
                if arm.lr_plan == "sweep" and len(result.finals_by_lr) > 1:
                    variant = tuned_variant(arm)
                    arms[variant.name] = _arm_result(variant, task, records, size, source=arm.name)
        for name in sorted({r.arm for r in records if r.task == task} - set(arms) - {"rl_train"}):
            arm = arm_named(name) or (pbt_arm(int(name[3:])) if name.startswith("pbt") else None)
            if arm is not None:  # arms of a run made with another size (e.g. --report-only)
                result = _arm_result(arm, task, records, size, base_lr=base_lr)
                if result is not None:
                    arms[name] = result
        medians = [a.summary.median for a in arms.values() if a.summary is not None]
        best = min(medians) if medians else math.nan
        reference = arms.get(REFERENCE_ARM)
        target = reference.summary.median if reference is not None and reference.summary else math.nan
        fixed = arms.get("fixed")
        rl_train_steps = sum(r.executed for r in _select(records, task, "rl_train"))
        if size.rl_paired_reference:  # each episode first ran its reference
            rl_train_steps *= 2
        for result in arms.values():
            if reference is not None and result is not reference:
                result.vs_cosine = paired_comparison(result.finals, reference.finals)
            if fixed is not None and result is not fixed:
                result.vs_fixed = paired_comparison(result.finals, fixed.finals)
                same = fixed.finals_by_lr.get(result.headline_lr) if result.headline_lr is not None else None
                if same and result.arm.name != "fixed" + TUNED_SUFFIX:
                    result.vs_fixed_same_lr = paired_comparison(result.finals, same)
            if math.isfinite(target):
                result.steps_to_target = {
                    seed: steps_to_target(rec.steps, rec.val_loss, target) for seed, rec in result.curves.items()
                }
            if result.arm.family in ("rl", "rl_control") and result.arm.name != "rl_untrained":
                result.one_time_steps = rl_train_steps
            base = arms.get(RL_BASE_ARM)
            if result.arm.lr_plan in ("rl", "base") and base is not None and result.headline_lr == base.headline_lr:
                # at the base's tuned lr: the base's tuning is part of its cost
                result.cost_trials += base.cost_trials
                result.cost_steps += base.cost_steps
            if len(result.finals_by_lr) > 1:  # ran over the lr grid: robustness to the initial lr
                result.robustness = robustness(
                    {lr: list(v.values()) for lr, v in result.finals_by_lr.items()}, best
                )
        rl = None
        if "rl" in arms or _select(records, task, "rl_train"):
            rl = _rl_result(task, records, size, (replay_schedules or {}).get(task, []), (policy_stats or {}).get(task, {}))
        out[task] = TaskResult(task=task, target=target, arms=arms, best_overall=best, rl=rl)
    return out
