"""The RL stop action with a compute cost vs Tune's ASHA: final val_loss against steps used.

Issue 13: "with the stop action and cost_weight > 0: final loss vs steps used, plotted against
ASHA on the same trials and seeds". One population of trials (the task's tuned cosine at 0.3x to
3x its tuned lr, on evaluation seeds no training run uses), run four ways through Tune with the
provided trainable:

- ``full``: every trial to ``max_steps`` (FIFO);
- ``asha g<grace> rf<factor>``: Tune's ``ASHAScheduler`` on ``val_loss`` (a population rule);
- ``stop cw=<w>``: the same trials with a frozen stop-only RL policy (``lr_actions=[1.0]``: it
  never changes the lr, it may only end a run), trained first through one shared
  :class:`~ray_metaopt.rl.PolicyActor` on training seeds with ``cost_metric="steps"`` and
  ``cost_weight=w`` (log-val_loss units given up per step saved);
- ``stop cw=<w> + asha``: both: the learned per-trial rule inside ASHA's population rule;
- ``cosine over <f> of the steps``: every trial planned shorter (the cosine decays to 0 over
  ``f x max_steps``): what a user who wants fewer steps per run does without either.

A stop-only policy does not change the lr, so a stopped run is the full run cut at that step
(the script checks it); it competes with cutting every run at the same mean step, which the
table also gives (from the full runs' curves).

Each arm gives steps used (% of the full population's) and two losses: the mean final val_loss
of the trials (what per-run stopping trades) and the best trial's (what a tuning run is for,
and what ASHA optimises). Prints a table, writes ``RESULTS-stop.md``-ready markdown, a JSON of
every trial and a plot.

Example:
    .venv/bin/python benchmarks/stop_vs_asha.py --task mnist1d --output /tmp/stop
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import uuid
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from ray_metaopt.bench.arms import SUITE_SIZES, ArmContext, arm_named, trial_config
from ray_metaopt.bench.pretrain import LR_FACTORS, REFERENCE_LRS
from ray_metaopt.bench.runner import grid_space
from ray_metaopt.rl import save_policy, start_policy_actor
from ray_metaopt.tune import metaopt_trainable

EVAL_SEEDS = tuple(range(600, 605))  # never used by any training or tuning run
TRAIN_SEEDS = tuple(range(2000, 2024))
# The stop-only policy: one lr action ("keep"), no weight-decay head; what the actor owns.
POLICY = {
    "lr_actions": [1.0],
    "wd_actions": None,
    "stop_action": True,
    "initial_stop_prob": 0.05,
    "policy_lr": 3e-3,
    "batch_size": 16,
    "gamma": 1.0,
    "return_horizon": 1000,
}


def population(task: str, seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    size = SUITE_SIZES["quick"]
    configs = []
    for seed in seeds:
        for factor in LR_FACTORS:
            config = trial_config(arm_named("cosine"), ArmContext(task, size, REFERENCE_LRS[task] * factor, seed))
            config["_bench"] = {"factor": factor, "seed": seed}
            configs.append(config)
    return configs


def with_policy(configs: list[dict[str, Any]], meta_config: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**c, "meta": "rl", "meta_config": dict(meta_config)} for c in configs]


def run(configs: list[dict[str, Any]], name: str, storage: str, scheduler: Any = None) -> list[dict[str, Any]]:
    """Run ``configs`` (one trial each) through Tune; each trial's steps, final val_loss and stop reason."""
    tuner = tune.Tuner(
        metaopt_trainable,
        param_space=grid_space(configs),
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler, max_concurrent_trials=None),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0),
    )
    grid = tuner.fit()
    rows = []
    for result in grid:
        if result.error is not None:
            raise RuntimeError(f"{name}: trial failed: {result.error}")
        m = result.metrics
        rows.append(
            {
                "factor": result.config["_bench"]["factor"],
                "seed": result.config["_bench"]["seed"],
                "steps": int(m["step"]),
                "val_loss": float(m["val_loss"]),
                "stop_reason": m.get("stop_reason") or "asha",
            }
        )
    return sorted(rows, key=lambda r: (r["seed"], r["factor"]))


def summarize(name: str, rows: list[dict[str, Any]], full_steps: int) -> dict[str, Any]:
    steps = sum(r["steps"] for r in rows)
    return {
        "arm": name,
        "steps_pct": 100.0 * steps / full_steps,
        "mean_val": statistics.fmean(r["val_loss"] for r in rows),
        "best_val": min(r["val_loss"] for r in rows),
        "policy_stops": sum(r["stop_reason"].startswith("policy_stop") for r in rows),
        "trials": rows,
    }


def _val_curves(storage: str, name: str) -> dict[tuple[int, float], dict[int, float]]:
    """Each trial's val_loss by step, from the result.json files Tune wrote."""
    import glob

    curves = {}
    for path in glob.glob(os.path.join(storage, name, "*", "result.json")):
        with open(path) as f:
            results = [json.loads(line) for line in f if line.strip()]
        tag = results[0]["config"]["_bench"]
        curves[(tag["seed"], tag["factor"])] = {int(r["step"]): float(r["val_loss"]) for r in results}
    return curves


def truncated(full: list[dict[str, Any]], stopped: list[dict[str, Any]], full_steps: int, storage: str) -> dict[str, Any]:
    """The full runs all cut at the stopped runs' mean step (interpolated between evaluations):
    the per-run rule's competitor that knows only the mean budget."""
    curves = _val_curves(storage, "full")
    mean_step = statistics.fmean(r["steps"] for r in stopped)
    for r in stopped:  # a stop-only policy leaves the lr alone: a stopped run is the full run, cut
        if not math.isclose(curves[(r["seed"], r["factor"])][r["steps"]], r["val_loss"], rel_tol=1e-9):
            raise RuntimeError(f"stopped run {r} differs from its full run")
    rows = []
    for key, curve in sorted(curves.items()):
        steps = sorted(curve)
        lo = max([s for s in steps if s <= mean_step], default=steps[0])
        hi = min([s for s in steps if s >= mean_step], default=steps[-1])
        w = 0.0 if hi == lo else (mean_step - lo) / (hi - lo)
        rows.append({"seed": key[0], "factor": key[1], "steps": mean_step,
                     "val_loss": (1 - w) * curve[lo] + w * curve[hi], "stop_reason": "cut"})
    return summarize(f"every run cut at that mean step ({mean_step:.0f})", rows, full_steps)


def train_policy(task: str, cost_weight: float, storage: str, path: str) -> dict[str, Any]:
    name = f"stop_{uuid.uuid4().hex[:8]}"
    actor = start_policy_actor(name, policy_config={**POLICY, "seed": 0})
    meta = {**POLICY, "cost_metric": "steps", "cost_weight": cost_weight, "shared_policy": name}
    started = time.time()
    rows = run(with_policy(population(task, TRAIN_SEEDS), meta), f"train_{name}", storage)
    save_policy(path, actor)
    state = ray.get(actor.policy_state.remote())
    ray.kill(actor)
    return {
        "episodes": len(rows),
        "episode_stops": sum(r["stop_reason"].startswith("policy_stop") for r in rows),
        "version": int(state["version"]),
        "minutes": (time.time() - started) / 60.0,
    }


def plot(summaries: list[dict[str, Any]], path: str, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "mean_val", "mean final val_loss of the trials"),
                           (axes[1], "best_val", "best trial's final val_loss")):
        for s in summaries:
            marker = "o" if s["arm"] == "full" else ("s" if s["arm"].startswith("asha") else "^")
            ax.scatter(s["steps_pct"], s[key], marker=marker, s=50)
            ax.annotate(s["arm"], (s["steps_pct"], s[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("steps used (% of running every trial to the end)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{task}: learned stop action vs ASHA, {len(summaries[0]['trials'])} trials, seeds {EVAL_SEEDS[0]}-{EVAL_SEEDS[-1]}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="mnist1d", choices=sorted(REFERENCE_LRS))
    parser.add_argument("--cost-weights", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--output", default="/tmp/stop_vs_asha")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.4, 0.6],
                        help="fractions of max_steps for the shorter-cosine arms")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    storage = os.path.abspath(os.path.join(args.output, "tune"))
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    started = time.time()
    configs = population(args.task, EVAL_SEEDS)
    full = run(configs, "full", storage)
    full_steps = sum(r["steps"] for r in full)
    summaries = [summarize("full", full, full_steps)]
    evals = SUITE_SIZES["quick"].max_steps[args.task] // SUITE_SIZES["quick"].eval_interval

    def asha(grace: int, factor: int) -> ASHAScheduler:
        return ASHAScheduler(time_attr="training_iteration", max_t=evals, grace_period=grace, reduction_factor=factor)

    interval = SUITE_SIZES["quick"].eval_interval
    for fraction in args.budgets:
        steps = max(interval, round(fraction * configs[0]["max_steps"] / interval) * interval)
        short = [{**c, "max_steps": steps} for c in configs]
        summaries.append(summarize(f"cosine over {fraction:.0%} of the steps", run(short, f"budget_{steps}", storage), full_steps))

    asha_settings = ((1, 3), (2, 2))
    for grace, factor in asha_settings:
        summaries.append(summarize(f"asha g{grace} rf{factor}", run(configs, f"asha_{grace}_{factor}", storage, asha(grace, factor)), full_steps))
    training = {}
    for w in args.cost_weights:
        path = os.path.join(args.output, f"stop_cw{w:g}.pt")
        training[f"{w:g}"] = train_policy(args.task, w, storage, path)
        frozen = {**POLICY, "cost_metric": "steps", "cost_weight": w, "policy_path": path, "frozen": True}
        rows = run(with_policy(configs, frozen), f"stop_{w:g}", storage)
        summaries.append(summarize(f"stop cw={w:g}", rows, full_steps))
        summaries.append(truncated(full, rows, full_steps, storage))
        grace, factor = asha_settings[0]
        rows = run(with_policy(configs, frozen), f"stop_asha_{w:g}", storage, asha(grace, factor))
        summaries.append(summarize(f"stop cw={w:g} + asha g{grace} rf{factor}", rows, full_steps))
    minutes = (time.time() - started) / 60.0
    lines = [
        f"| arm | steps used | mean final val_loss | best trial's val_loss | runs the policy stopped |",
        "|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['arm']} | {s['steps_pct']:.1f} % | {s['mean_val']:.4f} | {s['best_val']:.4f} | {s['policy_stops']} / {len(s['trials'])} |"
        )
    for w, t in training.items():
        lines.append(f"\nTraining, cost_weight={w}: {t['episodes']} episodes ({t['episode_stops']} stopped by the "
                     f"exploring policy), policy version {t['version']}, {t['minutes']:.1f} min.")
    lines.append(f"\nWall time {minutes:.1f} min; command: `{' '.join(['.venv/bin/python', 'benchmarks/stop_vs_asha.py', *sys.argv[1:]])}`")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.output, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump({"task": args.task, "eval_seeds": EVAL_SEEDS, "train_seeds": TRAIN_SEEDS, "policy": POLICY,
                   "summaries": summaries, "training": training, "minutes": minutes}, f, indent=1)
    plot(summaries, os.path.join(args.output, "stop_vs_asha.png"), args.task)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
