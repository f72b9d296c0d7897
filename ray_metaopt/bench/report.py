"""Writes ``RESULTS.md``: the setup, the machine, one table per metric, and plain findings.

Every number comes from :mod:`~ray_metaopt.bench.analysis`; the findings are generated from
those numbers (what wins and what loses, stated the same way), so a rerun rewrites them.

Example:
    >>> text = render_report(results, size, machine=machine_info(), command="ray-metaopt bench --quick", ...)
"""

from __future__ import annotations

import datetime
import math
import os
import platform
from typing import Any, Mapping, Sequence

from .analysis import REFERENCE_ARM, ArmResult, TaskResult
from .arms import RL_BASE_ARM, RL_BASE_SCHEDULE, RL_NEAR_FACTORS, SuiteSize, arms_for, skipped_arms
from .stats import paired_comparison


# ----------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """CPU model and cores, memory, load, GPU, and the versions of Python, torch and Ray."""
    import ray
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "platform": platform.platform(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        info["load_average"] = None
    return info


# ----------------------------------------------------------------------------- formatting
def _display_path(path: str) -> str:
    """``path`` relative to the working directory when it is below it (as a user would type it)."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel



def _num(x: float | None, spec: str = ".4g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if math.isinf(x):
        return "diverged" if x > 0 else "-inf"
    return format(x, spec)


def _steps(x: float) -> str:
    if math.isnan(x):
        return "–"
    if math.isinf(x):
        return "not reached"
    return f"{x:.0f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _comparison(c: Any) -> str:
    if c is None:
        return "–"
    return f"×{_num(c.median_ratio, '.3f')}, {c.wins}/{c.n} lower (p={c.p_value:.2g})"


def _lr(arm: ArmResult) -> str:
    if arm.arm.family == "pbt":
        return "sampled"
    if arm.headline_lr is None:
        return "–"
    suffix = " (tuned)" if arm.arm.lr_plan == "tune" else ""
    return f"{arm.headline_lr:.3g}{suffix}"


def _cost(arm: ArmResult) -> str:
    text = f"{arm.cost_trials} × {_steps(arm.cost_steps / max(1, arm.cost_trials))} = {_steps(arm.cost_steps)}"
    if arm.one_time_steps:
        text += f" + {arm.one_time_steps} one-time (policy training)"
    return text


def headline_table(result: TaskResult) -> str:
    rows = []
    for arm in sorted(result.arms.values(), key=lambda a: (a.summary.median if a.summary else math.inf)):
        s = arm.summary
        final = "–" if s is None else f"{_num(s.median)} [{_num(s.q25)}, {_num(s.q75)}] (n={s.n})"
        rows.append(
            [
                f"`{arm.arm.name}`",
                _lr(arm),
                final,
                "reference" if arm.arm.name == REFERENCE_ARM else _comparison(arm.vs_cosine),
                _comparison(arm.vs_fixed_same_lr),
                f"{_steps(arm.median_steps_to_target)} ({arm.target_reached}/{len(arm.steps_to_target)})",
                _cost(arm),
                f"{arm.num_diverged}/{arm.num_trials}" + (f" ({arm.num_errors} errors)" if arm.num_errors else ""),
            ]
        )
    return _table(
        [
            "arm",
            "initial lr",
            "final val loss: median [IQR]",
            "vs tuned cosine (paired by seed): median ratio, seeds lower",
            "vs constant lr at the same initial lr",
            "steps to target: median (seeds reaching it)",
            "tuning cost: trials × steps",
            "diverged trials",
        ],
        rows,
    )


def summary_table(results: Mapping[str, TaskResult]) -> str:
    """One table across tasks: each arm's median final-loss ratio to the tuned cosine, seeds lower.

    Rows are arms (ordered by their geometric-mean ratio over the tasks they ran on), columns
    tasks; a cell is ``×ratio (lower/n)`` (below 1: the arm ends lower than the tuned cosine).
    """
    tasks = list(results)
    names: list[str] = []
    for result in results.values():
        names += [n for n in result.arms if n not in names]

    def ratio(task: str, name: str) -> float | None:
        arm = results[task].arms.get(name)
        if arm is None:
            return None
        if name == REFERENCE_ARM:
            return 1.0
        c = arm.vs_cosine
        return None if c is None or not math.isfinite(c.median_ratio) or c.median_ratio <= 0 else c.median_ratio

    def order(name: str) -> float:
        ratios = [r for t in tasks if (r := ratio(t, name)) is not None]
        return math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else math.inf

    rows = []
    for name in sorted(names, key=order):
        cells = []
        for task in tasks:
            arm = results[task].arms.get(name)
            if arm is None:
                cells.append("–")
            elif name == REFERENCE_ARM:
                cells.append("reference")
            else:
                c = arm.vs_cosine
                if c is not None and math.isfinite(c.median_ratio):
                    cells.append(f"×{_num(c.median_ratio, '.3f')} ({c.wins}/{c.n})")
                elif arm.num_errors:
                    cells.append(f"failed ({arm.num_errors}/{arm.num_trials} trials errored)")
                elif arm.num_diverged:
                    cells.append(f"diverged ({arm.num_diverged}/{arm.num_trials} trials)")
                else:
                    cells.append("–")
        rows.append([f"`{name}`", *cells])
    return _table(["arm", *(f"`{t}`" for t in tasks)], rows)


def robustness_table(result: TaskResult) -> str | None:
    arms = [a for a in result.arms.values() if a.robustness is not None]
    if not arms:
        return None
    lrs = sorted({lr for a in arms for lr in a.robustness.medians})
    rows = []
    for arm in sorted(arms, key=lambda a: a.robustness.worst):
        r = arm.robustness
        rows.append(
            [f"`{arm.arm.name}`"]
            + [_num(r.medians.get(lr)) for lr in lrs]
            + [_num(r.worst), _num(r.worst_over_best, ".2f"), _num(r.geo_mean), f"{arm.num_diverged}/{arm.num_trials}"]
        )
    return _table(
        ["arm"] + [f"lr {lr:.3g}" for lr in lrs]
        + ["worst median", "worst / task's best", "geometric mean over lrs", "diverged"],
        rows,
    )


def _describe(arm: ArmResult, reference: str) -> str:
    c = arm.vs_cosine
    if c is None or arm.summary is None:
        return ""
    direction = "lower than" if c.median_ratio < 1 else "higher than" if c.median_ratio > 1 else "level with"
    return (
        f"`{arm.arm.name}` ends {direction} {reference} (median ratio ×{_num(c.median_ratio, '.3f')}, "
        f"lower on {c.wins} of {c.n} seeds, sign test p={c.p_value:.2g})"
    )


def findings(result: TaskResult) -> list[str]:
    """Plain statements generated from the numbers: the winners and the losers alike."""
    out = []
    arms = {n: a for n, a in result.arms.items() if a.summary is not None}
    if not arms:
        return ["no arm finished"]
    ranked = sorted(arms.values(), key=lambda a: a.summary.median)
    out.append(
        f"Lowest median final validation loss: `{ranked[0].arm.name}` ({_num(ranked[0].summary.median)}); "
        f"highest: `{ranked[-1].arm.name}` ({_num(ranked[-1].summary.median)})."
    )
    ref = arms.get(REFERENCE_ARM)
    if ref is not None:
        better = [a for a in arms.values() if a.vs_cosine and a.vs_cosine.wins > a.vs_cosine.losses and a.vs_cosine.median_ratio < 1]
        worse = [a for a in arms.values() if a.vs_cosine and a.vs_cosine.losses > a.vs_cosine.wins and a.vs_cosine.median_ratio > 1]
        out.append(
            "Better than the tuned cosine schedule on most seeds: "
            + (", ".join(f"`{a.arm.name}`" for a in better) if better else "no arm")
            + ". Worse on most seeds: "
            + (", ".join(f"`{a.arm.name}`" for a in worse) if worse else "no arm")
            + f". With {ref.summary.n} seeds the smallest possible two-sided sign-test p is "
            f"{2 * 0.5 ** ref.summary.n:.2g}, so only a clean sweep is strong evidence."
        )
    cheap = [a for a in arms.values() if a.cost_trials == 1 and not a.one_time_steps and a.arm.family != "baseline"]
    if ref is not None and cheap:
        best_cheap = min(cheap, key=lambda a: a.summary.median)
        out.append(
            f"Among single-run arms (no tuning, no policy training), `{best_cheap.arm.name}` is best: "
            + _describe(best_cheap, "the tuned cosine")
            + f", at {ref.cost_trials}x less tuning cost."
        )
    diverging = [a for a in result.arms.values() if a.num_diverged]
    if diverging:
        out.append(
            "Divergence: "
            + ", ".join(f"`{a.arm.name}` {a.num_diverged}/{a.num_trials} trials" for a in diverging)
            + " (a non-finite loss stops the trial; its final loss counts as infinite)."
        )
    else:
        out.append("No trial diverged.")
    rob = [a for a in result.arms.values() if a.robustness is not None]
    if rob:
        most = min(rob, key=lambda a: (a.robustness.geo_mean, a.robustness.worst))
        least = max(rob, key=lambda a: (a.robustness.geo_mean, a.robustness.worst))
        out.append(
            f"Across the initial lrs ({len(most.robustness.medians)} lrs over "
            f"{math.log10(max(most.robustness.medians) / min(most.robustness.medians)):.0f} decades), "
            f"`{most.arm.name}` is the most robust (geometric mean of its medians {_num(most.robustness.geo_mean)}, "
            f"worst {_num(most.robustness.worst)} = ×{_num(most.robustness.worst_over_best, '.2f')} the task's best) "
            f"and `{least.arm.name}` the least (geometric mean {_num(least.robustness.geo_mean)}, worst "
            f"{_num(least.robustness.worst)})."
        )
    return out


def _training_lrs(rl: Any, grid: Sequence[float] = ()) -> str:
    """How the RL training episodes' initial lrs were chosen, read from the episodes themselves."""
    lrs = {e.lr for e in rl.episodes if e.lr is not None}
    grid = sorted(float(x) for x in grid)
    if not grid or lrs <= set(grid):
        return "every lr of the grid"
    mids = {math.sqrt(a * b) for a, b in zip(grid, grid[1:])}
    if all(any(math.isclose(lr, m, rel_tol=1e-9) for m in [*grid, *mids]) for lr in lrs):
        return "every lr of the grid and the geometric midpoint of each pair of neighbours"
    return f"{len(lrs)} distinct initial lrs (one log-uniform draw per grid-wide stratum, per seed)"


def _learning_curve_line(rl: Any, base: str) -> str:
    """The report's sentence on the RL training episodes' returns against their references."""
    n = len(rl.episodes)
    if rl.paired_episodes == n:
        against = "its own paired reference (the base schedule run first at the episode's seed and lr)"
    elif rl.paired_episodes:
        against = (
            f"its own paired reference where it has one ({rl.paired_episodes} of {n} episodes), else the {base} "
            "runs at the same initial lr on the evaluation seeds"
        )
    else:
        against = f"the base schedule alone at the same initial lr (the {base} runs, on the evaluation seeds)"
    return (
        "Learning curve: an episode's return (the sum of its rewards, log(first/last) training loss plus "
        f"log(first/last) validation loss) minus that of {against}. "
        f"Mean over the first round of training seeds (one episode per lr): {_num(rl.first_round_mean, '+.3f')}; "
        f"over the last round: {_num(rl.last_round_mean, '+.3f')}; over the first / last half of the rounds: "
        f"{_num(rl.first_half_mean, '+.3f')} / {_num(rl.last_half_mean, '+.3f')}. Positive: the policy's lr "
        "changes improved on following the base schedule."
    )


def rl_section(result: TaskResult, lr_grid: Sequence[float] = ()) -> list[str]:
    rl = result.rl
    if rl is None:
        return []
    lines = [f"### RL policy on `{result.task}`", ""]
    trained = result.arms.get("rl")
    steps = sum(e.executed for e in rl.episodes)
    stats = rl.policy_stats
    source = stats.get("policy/source")
    if source is not None:
        lines.append(
            f"Training: none in this run. The RL arms act with the policy read from `{source}` (version "
            f"{stats.get('policy/version', '–')}, {stats.get('policy/updates', '–')} REINFORCE updates when it was "
            "saved), so every figure below is a transfer test of that policy."
        )
    else:
        lines.append(
            f"Training: {len(rl.episodes)} episodes ({steps} optimizer steps) on fresh seeds, "
            f"{_training_lrs(rl, lr_grid)}, one shared policy actor. Policy after training: version "
            f"{stats.get('policy/version', '–')}, {stats.get('policy/updates', '–')} REINFORCE updates from "
            f"{stats.get('rollouts/transitions', '–')} transitions, entropy {_num(stats.get('policy/entropy'), '.3f')}."
        )
    base = f"`{rl.base_arm}`"
    at = f"{rl.base_lr:.3g}" if rl.base_lr is not None else "the default lr"
    lines.append(
        f"Base schedule: the RL arms act on {base}'s schedule (each decision multiplies what it gives at that step), "
        f"and are reported at {base}'s tuned lr, {at}; untrained, the policy is that schedule exactly."
    )
    if rl.episodes:
        lines.append(_learning_curve_line(rl, base))
    lines.append("")
    controls = [n for n in ("rl_untrained", "rl_state_blind", "rl_replay") if n in result.arms]
    if trained is not None and controls:
        rows = []
        for name in controls:
            c = paired_comparison(trained.finals, result.arms[name].finals)
            rows.append([f"`rl` vs `{name}`", _comparison(c)])
        own = rl.vs_base_by_lr.get(trained.headline_lr) if trained.headline_lr is not None else None
        rows.append([f"`rl` vs {base} at the same lr", _comparison(own)])
        fixed = result.arms.get("fixed")
        if fixed is not None:
            fixed_same = fixed.finals_by_lr.get(trained.headline_lr, {}) if trained.headline_lr else {}
            rows.append(["`rl` vs `fixed` at the same lr", _comparison(paired_comparison(trained.finals, fixed_same))])
        lines += [_table([f"comparison at lr {at}", "median ratio, seeds where `rl` is lower"], rows), ""]
    if rl.vs_base_by_lr:
        def label(lr: float) -> str:
            if rl.base_lr is None or math.isclose(lr, rl.base_lr):
                return f"{lr:.3g}" + (" (tuned)" if rl.base_lr is not None else "")
            return f"{lr:.3g} (×{lr / rl.base_lr:.3g} tuned)"
        rows = [[label(lr), _comparison(c)] for lr, c in rl.vs_base_by_lr.items()]
        lines += [_table(["initial lr", f"`rl` vs {base} at that lr"], rows), ""]
    if rl.replay_schedule:
        final = rl.replay_schedule[-1][1]
        lines.append(
            f"The trained policy's average lr-multiplier trajectory at lr {at} (what `rl_replay` replays on the "
            f"same base) has {len(rl.replay_schedule)} changes and ends at ×{final:.3g} the base."
        )
        lines.append("")
    lines += [f"- {line}" for line in rl_verdict(result, lr_grid)] + [""]
    lines.append(
        "Reproducibility: trials send transitions to the shared actor and pick up new weights asynchronously, so "
        "which weights acted when depends on timing, and the trained policy (every RL row) changes from run to run; "
        "rerun the suite to see that spread. The other arms are seeded and repeat bit for bit (PBT apart: its "
        "exploit/explore decisions depend on timing too)."
    )
    lines.append("")
    return lines


def _lower(c: Any) -> bool | None:
    """Whether the candidate is lower on most seeds (None: no comparison or a draw)."""
    if c is None or c.wins == c.losses:
        return None
    return c.wins > c.losses


def rl_verdict(result: TaskResult, lr_grid: Sequence[float] = ()) -> list[str]:
    """What the RL comparisons say, stated from the numbers (and the design facts that explain them)."""
    arms = result.arms
    trained = arms.get("rl")
    if trained is None or trained.summary is None:
        return ["The trained policy was not evaluated (see the notes)."]
    out = []
    vs_cos = _lower(trained.vs_cosine)
    c = trained.vs_cosine
    if c is not None:
        out.append(
            ("The trained RL policy beats" if vs_cos else "The trained RL policy does **not** beat")
            + f" the tuned cosine baseline (median ratio ×{_num(c.median_ratio, '.3f')}, lower on {c.wins} of {c.n} "
            f"seeds), even before counting its {trained.one_time_steps} training steps."
        )
    same = []
    for name, what in (("rl_untrained", "the untrained policy"), ("rl_state_blind", "the state-blind policy"),
                       ("rl_replay", "the replayed average trajectory")):
        if name in arms:
            cmp = paired_comparison(trained.finals, arms[name].finals)
            verdict = _lower(cmp)
            if verdict is not True:
                same.append(what)
            out.append(
                f"Against {what}: {'lower' if verdict else 'not lower'} on most seeds ({_comparison(cmp)})."
            )
    if same:
        out.append(
            "Where the trained policy is not better than " + ", ".join(same) + ", what it learned is no more than that "
            "control: a drift of the lr (a noisy schedule) rather than a response to the training state."
        )
    rl = result.rl
    if rl is not None and rl.replay_schedule and rl.replay_schedule[-1][1] < 0.25:
        out.append(
            f"On average the policy ends at ×{rl.replay_schedule[-1][1]:.3g} of its base schedule. Each "
            "action is rewarded by the loss improvement of the next few intervals, and cutting the lr lowers the "
            "loss at once (less gradient noise) while costing progress later: the short-horizon bias of greedy "
            "lr control (Wu et al., 2018)."
        )
    if rl is not None and not rl.episodes:  # a policy read from a file: nothing was learned here
        return out
    out.append(
        "Design facts that bound what it can learn here: the state carries the lr on an absolute scale "
        "(`log10_lr`) beside its ratio to the initial lr, the log-loss and the last action's multiplier, and the "
        f"policy has trained on {_training_lrs(rl, lr_grid) if rl else 'every lr of the grid'}; each action sets the lr to ×0.5, ×1 or ×2 of the base "
        f"schedule (`{rl.base_arm if rl else RL_BASE_ARM}`'s, anchored, never compounding); REINFORCE learns from "
        f"{len(result.rl.episodes) if result.rl else 0} episodes of credit-assigned log-loss improvements, a few "
        "thousand noisy transitions at most in the quick size."
    )
    return out


def _rl_training_setup(size: SuiteSize) -> str:
    """How the RL arms' policy came about: trained in this run (how), or read from a file."""
    if size.rl_policy_path is not None:
        return f"not trained in this run: the policy is read from `{size.rl_policy_path}` (a transfer test)"
    lrs = {
        "grid": "every grid lr",
        "stratified": "one log-uniform lr per grid-wide stratum (its own draw per seed)",
        "dense": "every grid lr and the geometric midpoint of each pair of neighbours",
        "reference": "the task's tuned lr found on seeds 0-4 times 0.3, 0.55, 1, 1.8 and 3",
    }[size.rl_train_lrs]
    reward = (
        " (reward against a paired reference: each training trial first runs the base schedule at its seed "
        "and lr, `paired_reference=True`)"
        if size.rl_paired_reference
        else " (reward: the episode's own log-loss drops)"
    )
    return f"trained through one shared policy actor (`MetaOptCallback`) on {len(size.rl_train_seeds)} fresh seeds × {lrs}{reward}"


def render_report(
    results: Mapping[str, TaskResult],
    size: SuiteSize,
    *,
    machine: Mapping[str, Any],
    command: str,
    wall_seconds: float,
    timings: Mapping[str, float],
    notes: Sequence[str] = (),
    plots: Sequence[str] = (),
    plot_note: str | None = None,
    machine_after: Mapping[str, Any] | None = None,
    output_dir: str = ".",
) -> str:
    """The full ``RESULTS.md`` text."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# ray_metaopt benchmark results",
        "",
        (
            f"Generated {now} by `{command}` ({size.name} size) in {wall_seconds / 60:.1f} minutes of wall time. "
            "Regenerate the report from the saved data with `ray-metaopt bench --report-only "
            f"{_display_path(os.path.join(output_dir, 'results.json'))}`."
        ),
        "",
        "## Machine",
        "",
        (
            f"- CPU: {machine.get('cpu')} ({machine.get('cores')} cores visible), memory "
            f"{_num(machine.get('memory_gib'), '.0f')} GiB; GPU: {machine.get('gpu') or 'none'}"
        ),
        f"- Python {machine.get('python')}, torch {machine.get('torch')}, Ray {machine.get('ray')}; {machine.get('platform')}",
    ]
    load = machine.get("load_average")
    if load:
        after = (machine_after or {}).get("load_average")
        lines.append(
            f"- Load average (1/5/15 min) at the start: {', '.join(f'{x:.1f}' for x in load)}"
            + (f"; at the end: {', '.join(f'{x:.1f}' for x in after)}" if after else "")
            + ". A load above the core count means other processes shared the CPUs: wall times and "
            "steps/s are pessimistic, losses are unaffected (every trial is seeded)."
        )
    lines.append(
        "- Wall time per experiment: " + ", ".join(f"{name} {secs:.0f}s" for name, secs in timings.items())
    )
    lines += ["", "## Setup", ""]
    lines.append(
        "- Tasks: " + "; ".join(
            f"`{t}` ({size.max_steps[t]} steps, task_config {dict(size.task_configs.get(t, {}))})" for t in size.tasks
        )
        + f". AdamW (weight decay 1e-4), batch {size.batch_size}"
        + "".join(f" ({t}: {b})" for t, b in size.batch_sizes.items() if t in size.tasks)
        + f", evaluation every {size.eval_interval} steps, "
        "gradient clipping at 1.0 (the provided trainable's defaults)."
    )
    lines.append(
        f"- Evaluation seeds {list(size.seeds)}, the same for every arm: comparisons are paired by seed "
        "(same initialisation and batch stream)."
    )
    lines.append(
        f"- lr grid (log-spaced over three decades): {[f'{x:.3g}' for x in size.lr_grid]}; default lr "
        f"{size.default_lr:.3g} (the grid's centre). Tuned arms report the grid lr with the best median final loss, "
        "chosen on the same seeds it is reported on (optimistic for them), and cost the whole grid."
    )
    lines.append(
        f"- Final loss = validation loss at the step budget. Target for *steps to target* = the tuned cosine "
        "median final loss of the task; *steps* counts the reported run only (evaluations are every "
        f"{size.eval_interval} steps), *tuning cost* counts every trial behind one final model."
    )
    lines.append(
        f"- PBT (`ray.tune.schedulers.PopulationBasedTraining`): populations {list(size.pbt_populations)} on "
        f"{list(size.pbt_tasks)}, one population per evaluation seed (every member trains at that seed; the "
        "populations of one size share one Tune experiment, each under its own PBT scheduler, `GroupedScheduler`), lr sampled "
        f"log-uniformly over the grid's range and mutated, perturbation every {size.pbt_perturbation_evals} "
        "evaluations (`time_attr=training_iteration`: Ray's default interval is 60 s of wall time, longer than a "
        "quick trial), Ray's defaults otherwise (quantile 0.25, resample probability 0.25, factors 1.2/0.8). "
        "Reported: the best member's final loss."
    )
    lines.append(
        f"- RL (on {list(size.rl_tasks)}): `RLMetaOptimizer` deciding every {size.rl_update_every} steps with "
        f"policy {size.policy()}, acting on the `{RL_BASE_SCHEDULE}` schedule (the `{RL_BASE_ARM}` arm without a "
        "policy: each action multiplies what that schedule gives at the step); "
        + _rl_training_setup(size)
        + ", then evaluated frozen "
        "(the mean readout of its action distribution: keep moved by what it learned) on the evaluation seeds, at "
        f"every grid lr and at {' and '.join(f'{f:g}x' for f in RL_NEAR_FACTORS)} the base's tuned lr (where the "
        "base runs too, as `rl_base`), and reported at the base's tuned lr. Controls at that lr: untrained policy "
        "(frozen initial weights: the base schedule), state-blind policy (trained weights, all-zero state), replay "
        "of the trained policy's geometric-mean lr-multiplier trajectory on the same base."
    )
    lines.append(
        "- Plateau rules (torch `ReduceLROnPlateau`, `plateau`, `advanced_plateau`) decide once per evaluation; "
        "their patience is "
        + ", ".join(f"{size.patience(t)} evaluation{'s' * (size.patience(t) != 1)} on `{t}`" for t in size.tasks)
        + " (10% of the evaluations, as torch's 10 epochs are of a 100-epoch run)."
    )
    lines += ["", "### Arms", ""]
    seen = set()
    arm_rows = []
    for task in size.tasks:
        for arm in arms_for(task, size):
            if arm.name not in seen:
                seen.add(arm.name)
                tasks = [t for t in size.tasks if arm.name in {a.name for a in arms_for(t, size)}]
                arm_rows.append([f"`{arm.name}`", arm.family, arm.description, ", ".join(tasks)])
    lines.append(_table(["arm", "family", "what", "tasks"], arm_rows))
    if any(skipped_arms(t, size) for t in size.tasks):
        lines += ["", "Not run:", ""]
        for task in size.tasks:
            for name, why in skipped_arms(task, size):
                lines.append(f"- `{name}` on `{task}`: {why}")
    if results:
        lines += [
            "",
            "## Summary: every arm against the tuned cosine, on every task",
            "",
            "Median ratio of the final validation loss to the tuned cosine's, paired by seed, and the seeds on "
            "which the arm ended lower (×1 would be a tie; below 1 is better). Per-task tables below.",
            "",
            summary_table(results),
        ]
    for task, result in results.items():
        lines += ["", f"## `{task}`", ""]
        lines += [f"Target (tuned cosine median): {_num(result.target)}.", ""]
        lines += ["### Final validation loss, steps to target, cost, divergence", "", headline_table(result), ""]
        rob = robustness_table(result)
        if rob:
            lines += ["### Robustness to the initial lr (median final val loss per initial lr)", "", rob, ""]
        lines += rl_section(result, size.lr_grid)
        lines += ["### Findings", ""]
        lines += [f"- {f}" for f in findings(result)]
        lines.append("")
    if notes:
        lines += ["## Notes from the run", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Plots", ""]
    if plot_note:
        lines.append(plot_note)
    for path in plots:
        name = os.path.basename(path)
        lines.append(f"![{name}]({name})")
    lines.append("")
    return "\n".join(lines)


def command_line(argv: Sequence[str]) -> str:
    """The command line as typed: ``ray-metaopt bench ...``."""
    import shlex

    return "ray-metaopt bench" + ("" if not argv else " " + shlex.join(list(argv)))


__all__ = ["command_line", "findings", "headline_table", "machine_info", "render_report", "robustness_table"]
