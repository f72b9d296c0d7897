"""The benchmark's PNGs: loss curves and lr trajectories per arm, robustness, the RL learning curve.

matplotlib is an optional dependency (extra ``[plot]``); without it :func:`write_plots` returns
no files and says why.

Example:
    >>> paths, note = write_plots(results, "benchmarks")
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

from .analysis import TUNED_SUFFIX, ArmResult, TaskResult
from .stats import quantile

# Line style by family, colour by arm: ten colours are not enough to tell every arm apart alone.
_STYLES = {"baseline": "-", "heuristic": "--", "pbt": "-.", "rl": ":", "rl_control": ":", "moe": (0, (5, 1))}


def _median_curve(records: Sequence, attr: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Median and quartiles across seeds at each reported step (steps every record has)."""
    by_step: dict[int, list[float]] = {}
    for rec in records:
        seen: dict[int, float] = {}
        for step, value in zip(rec.steps, getattr(rec, attr)):
            seen[int(step)] = float(value)  # after a PBT restore, the later value of a step wins
        for step, value in seen.items():
            by_step.setdefault(step, []).append(value if math.isfinite(value) else math.inf)
    steps = sorted(s for s, v in by_step.items() if len(v) == len(records))
    med = [quantile(by_step[s], 0.5) for s in steps]
    lo = [quantile(by_step[s], 0.25) for s in steps]
    hi = [quantile(by_step[s], 0.75) for s in steps]
    return steps, med, lo, hi


def _label(arm: ArmResult) -> str:
    if arm.headline_lr is None:
        return arm.arm.name
    return f"{arm.arm.name} (lr {arm.headline_lr:.3g})"


def _finite(values: Sequence[float]) -> list[float]:
    return [v if math.isfinite(v) else math.nan for v in values]


def _scatter_by_lr(ax, xs: Sequence[int], values: Sequence[float], lrs: Sequence[float], colors: Mapping) -> None:
    """One coloured scatter per initial lr of the finite ``values`` (the RL episodes' returns or advantages)."""
    for lr in colors:
        pts = [(x, v) for x, v, l in zip(xs, values, lrs) if l == lr and math.isfinite(v)]
        if pts:
            ax.scatter(*zip(*pts), color=colors[lr], s=18, label=f"initial lr {lr:.3g}")


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(results: Mapping[str, TaskResult], directory: str) -> tuple[list[str], str | None]:
    """Write the PNGs for every task into ``directory``; returns ``(paths, note)``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return [], f"plots skipped: matplotlib is not installed ({exc}); `pip install ray_metaopt[plot]`"
    os.makedirs(directory, exist_ok=True)
    paths: list[str] = []
    for task, result in results.items():
        arms = [a for a in result.arms.values() if a.curves and not a.arm.name.endswith(TUNED_SUFFIX)]
        cmap = plt.get_cmap("tab10")
        colors = {a.arm.name: cmap(i % 10) for i, a in enumerate(arms)}
        styles = {a.arm.name: _STYLES.get(a.arm.family, "-") for a in arms}

        fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(15, 5.5))
        for arm in arms:
            records = list(arm.curves.values())
            steps, med, lo, hi = _median_curve(records, "val_loss")
            if steps:
                ax_loss.plot(steps, _finite(med), label=_label(arm), color=colors[arm.arm.name], linestyle=styles[arm.arm.name])
                ax_loss.fill_between(steps, _finite(lo), _finite(hi), alpha=0.12, color=colors[arm.arm.name])
            steps, med, _, _ = _median_curve(records, "lr_trace")
            if steps:
                ax_lr.plot(steps, _finite(med), label=_label(arm), color=colors[arm.arm.name], linestyle=styles[arm.arm.name])
        if math.isfinite(result.target):
            ax_loss.axhline(result.target, color="black", linestyle=":", linewidth=1, label="target (tuned cosine median)")
        ax_loss.set(yscale="log", xlabel="step", ylabel="validation loss (median over seeds, IQR shaded)",
                    title=f"{task}: validation loss per arm")
        ax_lr.set(yscale="log", xlabel="step", ylabel="lr of group 0 at evaluations (median over seeds)",
                  title=f"{task}: learning-rate trajectories")
        ax_loss.legend(fontsize=7, ncol=2)
        ax_lr.legend(fontsize=7, ncol=2)
        paths.append(_save(plt, fig, os.path.join(directory, f"{task}_curves.png")))

        swept = [a for a in result.arms.values() if len(a.finals_by_lr) > 1]
        if swept:
            fig, ax = plt.subplots(figsize=(7.5, 5))
            for arm in swept:
                lrs = sorted(arm.finals_by_lr)
                meds = [quantile(list(arm.finals_by_lr[lr].values()), 0.5) for lr in lrs]
                ax.plot(lrs, _finite(meds), marker="o", label=arm.arm.name, color=colors.get(arm.arm.name),
                        linestyle=styles.get(arm.arm.name, "-"))
                for lr, m in zip(lrs, meds):
                    if not math.isfinite(m):
                        ax.annotate("diverged", (lr, ax.get_ylim()[1]), fontsize=7, color=colors.get(arm.arm.name))
            ax.set(xscale="log", yscale="log", xlabel="initial lr", ylabel="final validation loss (median over seeds)",
                   title=f"{task}: robustness to the initial lr")
            ax.legend(fontsize=8)
            paths.append(_save(plt, fig, os.path.join(directory, f"{task}_robustness.png")))

        rl = result.rl
        if rl is not None and rl.returns:
            fig, (ax_ret, ax) = plt.subplots(1, 2, figsize=(14, 5))
            xs = list(range(1, len(rl.returns) + 1))
            lrs = sorted(set(rl.lrs))
            lr_colors = {lr: plt.get_cmap("viridis")(i / max(1, len(lrs) - 1)) for i, lr in enumerate(lrs)}
            _scatter_by_lr(ax_ret, xs, rl.returns, rl.lrs, lr_colors)
            for lr in lrs:
                if lr in rl.baseline_returns and math.isfinite(rl.baseline_returns[lr]):
                    ax_ret.axhline(rl.baseline_returns[lr], color=lr_colors[lr], linestyle=":", linewidth=1)
            ax_ret.set(xlabel="training episode (in the order they finished)",
                       ylabel="episode return: log(first/last) train + val loss",
                       title=f"{task}: RL episode returns (dotted: constant lr)")
            ax_ret.legend(fontsize=7)
            _scatter_by_lr(ax, xs, rl.advantages, rl.lrs, lr_colors)
            ax.axhline(0.0, color="grey", linewidth=1)
            window = max(1, len(lrs))
            finite = [(x, r) for x, r in zip(xs, rl.advantages) if math.isfinite(r)]
            if len(finite) >= window:
                avg = [sum(r for _, r in finite[i - window + 1 : i + 1]) / window for i in range(window - 1, len(finite))]
                ax.plot([x for x, _ in finite[window - 1 :]], avg, color="black", label=f"moving mean ({window} episodes)")
            ax.set(xlabel="training episode (in the order they finished)",
                   ylabel="return minus the constant-lr return at that lr",
                   title=f"{task}: RL learning curve (above 0: better than leaving the lr alone)")
            ax.legend(fontsize=7)
            paths.append(_save(plt, fig, os.path.join(directory, f"{task}_rl_learning_curve.png")))
    return paths, None
