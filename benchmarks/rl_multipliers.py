"""The RL policy's lr multiplier by initial lr, read from a bench ``results.json``.

For every task and initial lr of the ``rl`` arm: the time-weighted geometric mean of the lr
multiplier (what the policy applied on top of its base schedule) over the first and the second
half of each trial, averaged geometrically over seeds, and the median ratio of the final
validation loss to its base schedule at the same seed and lr (``cosine``, or ``rl_base`` at the
off-grid lrs).

    python benchmarks/rl_multipliers.py benchmarks/rl_train_lrs/grid/results.json
"""

from __future__ import annotations

import collections
import gzip
import json
import math
import statistics
import sys


def _mean_log_factor(changes: list[list[float]], executed: int, start: float, end: float) -> float:
    """Time-weighted mean of log(factor) over steps [start, end) of ``[[from_step, factor], ...]``."""
    if not changes:
        return 0.0
    edges = [*changes, [executed, None]]
    total = weight = 0.0
    for (step, factor), (next_step, _) in zip(edges, edges[1:]):
        lo, hi = max(step, start), min(next_step, end)
        if hi > lo:
            total += math.log(factor) * (hi - lo)
            weight += hi - lo
    return total / weight if weight else 0.0


def multipliers(results: dict) -> dict[str, dict[float, tuple[int, float, float, float]]]:
    """``{task: {lr: (seeds, first-half multiplier, second-half multiplier, median ratio to base)}}``."""
    records = results["records"]
    base = {
        (r["task"], round(r["lr"], 8), r["seed"]): r["val_loss"][-1]
        for r in records
        if r["arm"] in ("cosine", "rl_base") and r["status"] != "error" and r["val_loss"]
    }
    rows: dict[str, dict[float, list]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in records:
        if r["arm"] != "rl" or r["status"] == "error" or not r["val_loss"]:
            continue
        executed = r["executed"] or 1
        first = _mean_log_factor(r["lr_changes"], executed, 0, executed / 2)
        second = _mean_log_factor(r["lr_changes"], executed, executed / 2, executed)
        reference = base.get((r["task"], round(r["lr"], 8), r["seed"]))
        ratio = r["val_loss"][-1] / reference if reference else math.nan
        rows[r["task"]][r["lr"]].append((first, second, ratio))
    out: dict[str, dict[float, tuple[int, float, float, float]]] = {}
    for task, by_lr in rows.items():
        out[task] = {
            lr: (
                len(v),
                math.exp(statistics.fmean(a for a, _, _ in v)),
                math.exp(statistics.fmean(b for _, b, _ in v)),
                statistics.median(c for *_, c in v),
            )
            for lr, v in sorted(by_lr.items())
        }
    return out


def main(paths: list[str]) -> None:
    for path in paths:
        with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
            table = multipliers(json.load(f))
        print(path)
        for task, by_lr in table.items():
            for lr, (n, first, second, ratio) in by_lr.items():
                print(f"  {task:16s} lr={lr:<9.3g} seeds={n}  multiplier x{first:.2f} / x{second:.2f}  "
                      f"final vs base x{ratio:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
