"""The benchmark's statistics: summaries over seeds, paired comparisons, targets, costs, robustness.

Pure functions over plain numbers, so every figure in ``RESULTS.md`` can be checked by hand.
A diverged trial's final loss is ``inf``: it counts in medians and quantiles (an arm that
diverges on most seeds has an infinite median) instead of silently dropping out.

Example:
    >>> summarize([0.3, 0.1, 0.2, math.inf]).median
    0.25
    >>> sign_test_p(wins=5, losses=0)
    0.0625
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from .._validation import check_int, check_range


def _floats(values: Iterable[float], name: str = "values") -> list[float]:
    out = []
    for v in values:
        v = float(v)
        if math.isnan(v):
            raise ValueError(f"{name} must not contain NaN (use inf for a diverged run), got {name} with NaN")
        out.append(v)
    return out


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile with linear interpolation (numpy's default), ``inf``-aware.

    Interpolating towards an ``inf`` gives ``inf`` (numpy would give ``inf`` or ``nan``).

    Args:
        values: finite numbers or ``+inf`` (no NaN), at least one.
        q: in ``[0, 1]``.

    Example:
        >>> quantile([1.0, 2.0, 3.0, 4.0], 0.25)
        1.75
    """
    q = check_range("q", q, 0.0, 1.0)
    xs = sorted(_floats(values))
    if not xs:
        raise ValueError("quantile of no values")
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    frac = pos - lo
    if frac == 0.0:
        return xs[lo]
    if math.isinf(xs[hi]) or math.isinf(xs[lo]):
        return math.inf
    return xs[lo] + (xs[hi] - xs[lo]) * frac


@dataclass(frozen=True)
class Summary:
    """Median and spread of one arm's values over seeds.

    Args:
        n: number of values.
        median, q25, q75: quantiles (``inf`` when enough values are ``inf``).
        low, high: smallest and largest value.
        num_inf: how many values were ``inf`` (diverged runs).
    """

    n: int
    median: float
    q25: float
    q75: float
    low: float
    high: float
    num_inf: int

    def to_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("n", "median", "q25", "q75", "low", "high", "num_inf")}


def summarize(values: Iterable[float]) -> Summary:
    """Median, quartiles, range and count of ``inf`` of ``values`` (at least one).

    Example:
        >>> s = summarize([4.0, 1.0, 3.0, 2.0, 5.0])
        >>> (s.median, s.q25, s.q75)
        (3.0, 2.0, 4.0)
    """
    xs = _floats(values)
    if not xs:
        raise ValueError("summarize needs at least one value, got none")
    return Summary(
        n=len(xs),
        median=quantile(xs, 0.5),
        q25=quantile(xs, 0.25),
        q75=quantile(xs, 0.75),
        low=min(xs),
        high=max(xs),
        num_inf=sum(math.isinf(x) for x in xs),
    )


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign-test p-value of ``wins`` against ``losses`` (ties left out before).

    Under the null hypothesis (no difference) each non-tied pair is a fair coin flip.

    Example:
        >>> round(sign_test_p(9, 1), 4)
        0.0215
    """
    wins = check_int("wins", wins, minimum=0)
    losses = check_int("losses", losses, minimum=0)
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class PairedComparison:
    """``candidate`` against ``reference`` on the seeds both ran (lower is better).

    Args:
        n: seeds compared.
        wins: seeds where the candidate's value is lower.
        losses: seeds where it is higher.
        ties: seeds with equal values (both ``inf`` counts as a tie).
        median_ratio: median over seeds of candidate / reference (``inf`` if the candidate
            diverged where the reference did not; 1 for a tie of two ``inf``).
        p_value: exact two-sided sign test of wins against losses.
    """

    n: int
    wins: int
    losses: int
    ties: int
    median_ratio: float
    p_value: float

    def to_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("n", "wins", "losses", "ties", "median_ratio", "p_value")}


def _ratio(a: float, b: float) -> float:
    if math.isinf(a) and math.isinf(b):
        return 1.0
    if math.isinf(a):
        return math.inf
    if math.isinf(b):
        return 0.0
    if b == 0.0:
        return 1.0 if a == 0.0 else math.inf
    return a / b


def paired_comparison(candidate: Mapping[int, float], reference: Mapping[int, float]) -> PairedComparison | None:
    """Compare per-seed values of two arms on their common seeds (``None`` if they share none).

    Example:
        >>> c = paired_comparison({0: 1.0, 1: 2.0, 2: 3.0}, {0: 2.0, 1: 2.0, 2: 1.0})
        >>> (c.wins, c.losses, c.ties, c.median_ratio)
        (1, 1, 1, 1.0)
    """
    seeds = sorted(set(candidate) & set(reference))
    if not seeds:
        return None
    wins = losses = ties = 0
    ratios = []
    for s in seeds:
        a, b = float(candidate[s]), float(reference[s])
        if math.isnan(a) or math.isnan(b):
            raise ValueError(f"paired_comparison got NaN for seed {s}: candidate={a}, reference={b}")
        if a < b:
            wins += 1
        elif a > b:
            losses += 1
        else:
            ties += 1
        ratios.append(_ratio(a, b))
    return PairedComparison(
        n=len(seeds),
        wins=wins,
        losses=losses,
        ties=ties,
        median_ratio=quantile(ratios, 0.5),
        p_value=sign_test_p(wins, losses),
    )


def best_setting(results: Mapping[float, Sequence[float]]) -> float:
    """The setting (e.g. an initial lr) with the lowest median final loss: the grid's "tuned" choice.

    Ties go to the smaller setting.

    Example:
        >>> best_setting({1e-3: [0.5, 0.4, 0.6], 1e-2: [0.3, 0.35, math.inf]})
        0.01
    """
    if not results:
        raise ValueError("best_setting needs at least one setting, got none")
    return min(sorted(results), key=lambda k: quantile(list(results[k]), 0.5))


def steps_to_target(steps: Sequence[int], losses: Sequence[float], target: float) -> int | None:
    """The first evaluation step whose loss is at or below ``target`` (``None``: never reached).

    Example:
        >>> steps_to_target([20, 40, 60], [0.5, 0.2, 0.1], 0.2)
        40
    """
    if len(steps) != len(losses):
        raise ValueError(f"steps and losses must have the same length, got {len(steps)} and {len(losses)}")
    for step, loss in zip(steps, losses):
        if math.isfinite(loss) and loss <= target:
            return int(step)
    return None


def executed_steps(steps: Sequence[int], eval_interval: int) -> int:
    """Optimizer steps a trial really ran, from the steps of its reports (tuning cost).

    Consecutive reports normally differ by ``eval_interval`` (less at the end or at divergence);
    a report that does not advance by 1..``eval_interval`` steps follows a restore (PBT copied
    another member's checkpoint), and counts the ``eval_interval`` steps trained since.

    Example:
        >>> executed_steps([20, 40, 60, 40, 60], 20)  # restored to a step-20 checkpoint after 60
        100
    """
    eval_interval = check_int("eval_interval", eval_interval, minimum=1)
    total, previous = 0, 0
    for step in steps:
        delta = int(step) - previous
        total += delta if 0 < delta <= eval_interval else min(int(step), eval_interval)
        previous = int(step)
    return total


def episode_return(
    train_losses: Sequence[float],
    val_losses: Sequence[float],
    val_weight: float = 1.0,
    *,
    steps: Sequence[int] | None = None,
    update_frequency: int = 1,
    reward_clip: float = math.inf,
) -> float:
    """An RL episode's undiscounted return, from its reported losses, computed with the policy's
    own reward code (:func:`ray_metaopt.rl.rewards.episode_rewards`: clipping and final term).

    The policy's per-interval reward is the drop in log training loss, so without clipping the
    rewards of an episode add up (telescope) to ``log(first / last)`` training loss; the final
    reward adds ``val_weight * log(first / last)`` validation loss. ``steps`` are the steps of
    ``train_losses`` (default: one apart). A diverged episode returns ``-inf``.

    Example:
        >>> round(episode_return([1.0, 0.5, 0.25], [2.0, 1.0]), 4)
        2.0794
    """
    from ..rl.rewards import episode_rewards

    if not train_losses or not val_losses:
        raise ValueError("episode_return needs at least one training and one validation loss")
    losses = [float(x) for x in train_losses]
    first_v, last_v = float(val_losses[0]), float(val_losses[-1])
    if not all(math.isfinite(x) and x > 0 for x in (*losses, first_v, last_v)):
        return -math.inf
    steps = list(range(len(losses))) if steps is None else list(steps)
    log_losses = [math.log(x) for x in losses]
    if len(log_losses) == 1:  # no interval: only the final term
        log_losses, steps = log_losses * 2, [0, 1]
    rewards = episode_rewards(
        log_losses, steps, update_frequency,
        log_val0=math.log(first_v), log_val=math.log(last_v), val_weight=val_weight, reward_clip=reward_clip,
    )
    return sum(rewards)


def mean_lr_factors(trajectories: Sequence[Sequence[tuple[int, float]]]) -> list[list[float]]:
    """Geometric mean over runs of piecewise-constant lr-factor trajectories.

    Each trajectory is ``[(from_step, factor), ...]`` sorted by step: the lr is
    ``factor * initial_lr`` from ``from_step`` on (factor 1 before the first entry). The result
    has an entry at every step where any run changed, holding the geometric mean of the factors
    in force there: a replay of "the average trajectory" in log-lr space.

    Example:
        >>> mean_lr_factors([[(10, 2.0)], [(10, 0.5), (20, 2.0)]])
        [[10, 1.0], [20, 2.0]]
    """
    times = sorted({int(t) for traj in trajectories for t, _ in traj})
    if not trajectories:
        return []
    out: list[list[float]] = []
    for t in times:
        logs = []
        for traj in trajectories:
            factor = 1.0
            for start, f in traj:
                if start <= t:
                    factor = float(f)
                else:
                    break
            if not (math.isfinite(factor) and factor > 0):
                raise ValueError(f"lr factors must be positive and finite, got {factor} at step {t}")
            logs.append(math.log(factor))
        mean = math.exp(sum(logs) / len(logs))
        if not out or out[-1][1] != mean:
            out.append([t, mean])
    return out


@dataclass(frozen=True)
class Robustness:
    """How an arm's median final loss varies over initial learning rates.

    Args:
        medians: ``{initial lr: median final loss}``.
        worst: the largest median (``inf`` if it diverges at some lr on most seeds).
        geo_mean: geometric mean of the medians (``inf`` if any is).
        worst_over_best: ``worst`` / the best median of any arm on the task (the regret of
            picking the worst lr of the range), given the task's best.
    """

    medians: dict[float, float]
    worst: float
    geo_mean: float
    worst_over_best: float


def robustness(by_lr: Mapping[float, Sequence[float]], task_best: float) -> Robustness:
    """Summarise an arm's finals by initial lr against the task's best median.

    Example:
        >>> r = robustness({1e-3: [2.0, 2.0], 1e-2: [1.0, 1.0]}, task_best=1.0)
        >>> (r.worst, r.worst_over_best, round(r.geo_mean, 4))
        (2.0, 2.0, 1.4142)
    """
    if not by_lr:
        raise ValueError("robustness needs results for at least one lr")
    medians = {float(lr): quantile(list(v), 0.5) for lr, v in sorted(by_lr.items())}
    worst = max(medians.values())
    if any(math.isinf(m) for m in medians.values()):
        geo = math.inf
    elif any(m <= 0 for m in medians.values()):
        geo = math.nan
    else:
        geo = math.exp(sum(math.log(m) for m in medians.values()) / len(medians))
    return Robustness(medians=medians, worst=worst, geo_mean=geo, worst_over_best=_ratio(worst, task_best))


def log_grid(low: float, high: float, num: int) -> list[float]:
    """``num`` log-spaced values from ``low`` to ``high`` (both included), rounded to 3 digits.

    Example:
        >>> log_grid(1e-4, 1e-1, 5)
        [0.0001, 0.000562, 0.00316, 0.0178, 0.1]
    """
    low = check_range("low", low, 0.0, math.inf, low_open=True, high_open=True)
    high = check_range("high", high, low, math.inf, high_open=True)
    num = check_int("num", num, minimum=1)
    if num == 1:
        return [low]
    return [float(f"{low * (high / low) ** (i / (num - 1)):.3g}") for i in range(num)]
