"""Rollout bookkeeping: decisions waiting for their rewards, and their truncated discounted returns.

Plain-data lists (the meta-optimizer keeps them in its ``state_dict``): ``pending`` holds acted
decisions whose return is not known yet, ``ready`` those whose return is known and that are not
learned from (or sent) yet.
"""

from __future__ import annotations

import math
from typing import Any


def discounted_return(rewards: list[float], gamma: float) -> float:
    """``sum(gamma**k * rewards[k])``."""
    return sum(gamma**k * r for k, r in enumerate(rewards))


def finalize(
    pending: list[dict[str, Any]],
    ready: list[dict[str, Any]],
    *,
    horizon: int,
    gamma: float,
    force: bool,
) -> tuple[int, int]:
    """Move from ``pending`` to ``ready`` (in place) the decisions whose return is known:
    ``horizon`` rewards after them, or, with ``force`` (the episode's end), every rewarded one.
    A decision that also carries ``stop_reward`` (a policy with a stop head) gets ``stop_ret``:
    the undiscounted sum of the same window's stop rewards (what continuing gained over it).
    Returns ``(moved, skipped)``; a non-finite return is skipped. With ``force`` the last,
    unrewarded decisions are dropped (they teach nothing)."""
    moved = skipped = 0
    while pending:
        known = 0
        for t in pending[:horizon]:
            if t["reward"] is None:
                break
            known += 1
        if known == 0 or (known < horizon and not force):
            break
        ret = discounted_return([pending[k]["reward"] for k in range(known)], gamma)
        if "stop_reward" in pending[0]:
            stop_ret = sum(pending[k].get("stop_reward", 0.0) for k in range(known))
            pending[0]["stop_ret"] = stop_ret
            ret = ret if math.isfinite(stop_ret) else math.nan
        t = pending.pop(0)
        t.pop("stop_reward", None)
        del t["reward"]
        t["ret"] = ret
        if math.isfinite(ret):
            ready.append(t)
            moved += 1
        else:
            skipped += 1
    if force:
        pending.clear()
    return moved, skipped
