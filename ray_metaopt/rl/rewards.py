"""The RL reward terms: one place that both the meta-optimizer and the benchmark use.

An action's reward is the drop in log training loss over the interval that follows it, per
``update_frequency`` steps (adaptive intervals stay comparable), minus a cost term, clamped to
``[-clip, clip]``; the last rewarded action of an episode also gets ``val_weight`` times the
log-improvement of ``val_loss`` over the run (clamped too). A circuit-breaker trip replaces the
interval reward by a fixed penalty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


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
) -> float:
    """Reward of one interval: log-loss drop per ``update_frequency`` steps, minus the cost, clamped.

    Example:
        >>> round(interval_reward(math.log(2.0), math.log(1.0), 10, 10), 4)
        0.6931
    """
    reward = (prev_log_loss - log_loss) / steps * update_frequency
    if cost_weight > 0.0 and cost is not None:
        reward -= cost_weight * cost * update_frequency
    return clip(reward, reward_clip)


def final_term(log_val0: float | None, log_val: float | None, val_weight: float, reward_clip: float = math.inf) -> float:
    """``val_weight`` x the log-improvement of the validation loss over the run (0 without one)."""
    if log_val0 is None or log_val is None or val_weight == 0.0:
        return 0.0
    return clip(val_weight * (log_val0 - log_val), reward_clip)


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
) -> list[float]:
    """The rewards of an episode observed at ``steps`` with ``log_losses``: one per interval,
    the final term added to the last. Used by the benchmark to score an episode exactly as the
    policy was rewarded (clipping and cost included)."""
    if len(log_losses) != len(steps):
        raise ValueError(f"log_losses and steps must have the same length, got {len(log_losses)} and {len(steps)}")
    rewards = []
    for k in range(1, len(steps)):
        gap = steps[k] - steps[k - 1]
        if gap <= 0:
            continue
        cost = None if costs is None else costs[k]
        rewards.append(
            interval_reward(
                log_losses[k - 1], log_losses[k], gap, update_frequency,
                cost=cost, cost_weight=cost_weight, reward_clip=reward_clip,
            )
        )
    if rewards:
        rewards[-1] += final_term(log_val0, log_val, val_weight, reward_clip)
    return rewards
