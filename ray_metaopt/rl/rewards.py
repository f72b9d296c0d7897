"""The RL reward terms: one place that both the meta-optimizer and the benchmark use.

An action's reward is the drop in log training loss over the interval that follows it, per
``update_frequency`` steps (adaptive intervals stay comparable), minus a cost term, clamped to
``[-clip, clip]``; the last rewarded action of an episode also gets ``val_weight`` times the
log-improvement of ``val_loss`` over the run (clamped too). A circuit-breaker trip replaces the
interval reward by a fixed penalty.

Paired reference (common random numbers): when the trial also reports ``reference_loss`` (the
training loss, at the same steps, of a run with the same seed, data order and initial lr on the
base schedule alone) the interval reward subtracts the reference's log-loss drop over the same
steps, and the final term compares ``val_loss`` with ``reference_val_loss`` instead of with the
run's first ``val_loss``. The reference does not depend on the actions, so the policy gradient
stays unbiased; what it removes is the noise both runs share (which batches came, which lr the
trial started at), and an episode's rewards then sum to its log-loss ratio to its base schedule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

REFERENCE_LOSS = "reference_loss"  # metric: the paired reference run's training loss at this step
REFERENCE_VAL_LOSS = "reference_val_loss"  # metric: its val_loss at this evaluation


def clip(value: float, bound: float) -> float:
    """``value`` clamped to ``[-bound, bound]``."""
    return min(max(value, -bound), bound)


def interval_reward(
    prev_log_loss: float,
    log_loss: float,
    steps: int,
    update_frequency: int,
    *,
    cost: float | None = None,
    cost_weight: float = 0.0,
    reward_clip: float = math.inf,
    reference: tuple[float, float] | None = None,
) -> float:
    """Reward of one interval: log-loss drop per ``update_frequency`` steps, minus the cost, clamped.

    ``reference``: the paired reference's ``(prev_log_loss, log_loss)`` at the same two steps;
    its drop is subtracted.

    Example:
        >>> round(interval_reward(math.log(2.0), math.log(1.0), 10, 10), 4)
        0.6931
        >>> round(interval_reward(math.log(2.0), math.log(1.0), 10, 10, reference=(math.log(2.0), math.log(1.0))), 4)
        0.0
    """
    drop = prev_log_loss - log_loss
    if reference is not None:
        drop -= reference[0] - reference[1]
    reward = drop / steps * update_frequency
    if cost_weight > 0.0 and cost is not None:
        reward -= cost_weight * cost * update_frequency
    return clip(reward, reward_clip)


def final_term(
    log_val0: float | None,
    log_val: float | None,
    val_weight: float,
    reward_clip: float = math.inf,
    log_ref_val: float | None = None,
) -> float:
    """``val_weight`` x the log-improvement of the validation loss over the run (0 without one),
    or, with the paired reference's ``log_ref_val`` (same evaluation step), over the reference."""
    start = log_val0 if log_ref_val is None else log_ref_val
    if start is None or log_val is None or val_weight == 0.0:
        return 0.0
    return clip(val_weight * (start - log_val), reward_clip)


def episode_rewards(
    log_losses: Sequence[float],
    steps: Sequence[int],
    update_frequency: int,
    *,
    log_val0: float | None = None,
    log_val: float | None = None,
    val_weight: float = 1.0,
    reward_clip: float = math.inf,
    cost_weight: float = 0.0,
    costs: Sequence[float | None] | None = None,
    reference_log_losses: Sequence[float | None] | None = None,
    log_ref_val: float | None = None,
) -> list[float]:
    """The rewards of an episode observed at ``steps`` with ``log_losses``: one per interval,
    the final term added to the last. Used by the benchmark to score an episode exactly as the
    policy was rewarded (clipping, cost and paired reference included)."""
    if len(log_losses) != len(steps):
        raise ValueError(f"log_losses and steps must have the same length, got {len(log_losses)} and {len(steps)}")
    if reference_log_losses is not None and len(reference_log_losses) != len(steps):
        raise ValueError(
            "reference_log_losses and steps must have the same length, "
            f"got {len(reference_log_losses)} and {len(steps)}"
        )
    rewards = []
    for k in range(1, len(steps)):
        gap = steps[k] - steps[k - 1]
        if gap <= 0:
            continue
        cost = None if costs is None else costs[k]
        ref = None
        if reference_log_losses is not None:
            a, b = reference_log_losses[k - 1], reference_log_losses[k]
            ref = None if a is None or b is None else (a, b)
        rewards.append(
            interval_reward(
                log_losses[k - 1], log_losses[k], gap, update_frequency,
                cost=cost, cost_weight=cost_weight, reward_clip=reward_clip, reference=ref,
            )
        )
    if rewards:
        rewards[-1] += final_term(log_val0, log_val, val_weight, reward_clip, log_ref_val)
    return rewards
