"""Plot learning rate and loss per trial from recorded hyperparameter trajectories.

matplotlib is an optional extra (``pip install "ray_metaopt[plot]"``); :func:`plot_trajectories`
raises :class:`MissingPlotDependency` (an ``ImportError``) naming it when it is not installed.
Drawing goes through matplotlib's object API with the Agg canvas, so it neither needs a display
nor changes the pyplot backend of the calling program.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

PLOT_EXTRA_HINT = 'matplotlib is not installed; install the plot extra: pip install "ray_metaopt[plot]"'


class MissingPlotDependency(ImportError):
    """matplotlib is not installed (the ``ray_metaopt[plot]`` extra)."""


def _finite_points(
    records: Sequence[Mapping[str, Any]], key: str, positive: bool
) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, record in enumerate(records):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        value = float(value)
        if not math.isfinite(value) or (positive and value <= 0):
            continue
        step = record.get("step", record.get("training_iteration", i))
        xs.append(float(step))
        ys.append(value)
    return xs, ys


def _distinct_lr_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """``["lr"]`` plus each ``lr/<group>`` whose values differ from it (groups moving together
    are drawn once)."""
    group_keys = sorted({k for r in records for k in r if k.startswith("lr/")})
    base = "lr" if any("lr" in r for r in records) else (group_keys[0] if group_keys else "lr")
    series = {k: [r.get(k) for r in records] for k in [base, *group_keys]}
    keys = [base]
    for key in group_keys:
        if all(series[key] != series[k] for k in keys):
            keys.append(key)
    return keys


def plot_trajectories(
    trajectories: Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    loss_keys: Sequence[str] = ("val_loss", "train_loss"),
    loss_floor: float | None = None,
    dpi: int = 110,
) -> str:
    """Write a PNG with the learning rate (top) and the loss (bottom) of every trial against step.

    Trials of the same strategy share a colour; ``lr`` is drawn solid and each param group whose
    lr (``lr/<group>``) differs from it dashed/dotted. Non-finite and non-positive values are left out
    (log scales).

    Args:
        trajectories: values of :attr:`MetaOptCallback.trajectories` (dicts with ``config`` and
            ``records``; ``config["strategy"]`` or ``config["meta"]`` names the strategy).
        path: the PNG file to write (parent directories are created).
        title: figure title.
        loss_keys: the first key present in a trial's records is its loss curve.
        loss_floor: draw this loss as a dotted line (e.g. the task's noise floor).
        dpi: resolution.

    Returns:
        ``path`` as a string.

    Example:
        >>> plot_trajectories(callback.trajectories.values(), "results/lr_loss.png")
        'results/lr_loss.png'
    """
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingPlotDependency(PLOT_EXTRA_HINT) from e

    trajectories = list(trajectories)
    fig = Figure(figsize=(10, 7.5), dpi=dpi)
    FigureCanvasAgg(fig)
    ax_lr, ax_loss = fig.subplots(2, 1, sharex=True)
    strategies: list[str] = []
    for t in trajectories:
        config = t.get("config", {})
        name = str(config.get("strategy") or config.get("meta") or "trial")
        if name not in strategies:
            strategies.append(name)
    cmap = matplotlib.colormaps["tab10"]
    colours = {name: cmap(i % 10) for i, name in enumerate(strategies)}
    linestyles = ["-", "--", ":", "-."]

    drew_lr = drew_loss = False
    labelled: set[str] = set()
    for t in trajectories:
        records = t.get("records", [])
        config = t.get("config", {})
        strategy = str(config.get("strategy") or config.get("meta") or "trial")
        colour = colours[strategy]
        label = strategy if strategy not in labelled else None
        labelled.add(strategy)
        lr_keys = _distinct_lr_keys(records)
        for i, key in enumerate(lr_keys):
            xs, ys = _finite_points(records, key, positive=True)
            if xs:
                ax_lr.plot(
                    xs,
                    ys,
                    color=colour,
                    linestyle=linestyles[i % len(linestyles)],
                    alpha=0.85,
                    label=label if i == 0 else None,
                )
                drew_lr = True
        for key in loss_keys:
            xs, ys = _finite_points(records, key, positive=True)
            if xs:
                ax_loss.plot(xs, ys, color=colour, alpha=0.85, label=label)
                drew_loss = True
                ax_loss.set_ylabel(key)
                break
        if t.get("status") == "ERROR" or any(r.get("diverged") for r in records):
            xs, ys = _finite_points(records, loss_keys[0], positive=True)
            if xs:
                ax_loss.plot(xs[-1:], ys[-1:], marker="x", color=colour, markersize=9)
    if loss_floor is not None and math.isfinite(loss_floor) and loss_floor > 0:
        ax_loss.axhline(loss_floor, color="black", linestyle=":", linewidth=1, label="noise floor")
        ax_loss.legend(loc="best", fontsize="small", handles=[ax_loss.get_lines()[-1]])
    ax_lr.set_ylabel("learning rate")
    if drew_lr:
        ax_lr.set_yscale("log")
        ax_lr.legend(loc="best", fontsize="small")
    if drew_loss:
        ax_loss.set_yscale("log")
    else:
        ax_loss.set_ylabel("loss")
    ax_loss.set_xlabel("step")
    ax_lr.grid(True, which="both", alpha=0.3)
    ax_loss.grid(True, which="both", alpha=0.3)
    fig.suptitle(title or "ray_metaopt: learning rate and loss per trial")
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path
