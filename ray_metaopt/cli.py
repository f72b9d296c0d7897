"""``ray-metaopt``: compare meta-optimization strategies on a built-in task with Ray Tune.

The default run (no arguments) starts a local Ray by itself, trains the built-in
``teacher_student`` task with two seeds per strategy (no meta-optimizer, a cosine schedule,
plateau, advanced plateau, the shared RL policy), shows Tune's progress output, then prints a results table and writes
``results.csv``/``results.json``, every trial's hyperparameter trajectory and a PNG of learning
rate and loss per trial into ``--output``. ``--address`` runs the same experiment on an existing
Ray cluster.

Examples::

    ray-metaopt                                  # the default comparison, a few minutes on 2 CPUs
    ray-metaopt --smoke                          # a tiny run (under a minute)
    ray-metaopt --strategies none plateau --num-samples 3 --max-steps 2000
    ray-metaopt --address auto --gpus-per-trial 0.5 --storage-path s3://bucket/experiments
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .registry import PresetContext, StrategySpec, preset_strategies, strategy_spec
from .tune.session import add_ray_arguments, init_ray

TASKS = ("teacher_student", "moe", "digits", "sequence", "charlm", "mnist1d", "digits_cnn")
DEFAULT_STRATEGIES = ("none", "cosine", "plateau", "advanced_plateau", "rl", "rl_pretrained")


@dataclass(frozen=True)
class Strategy:
    """One CLI strategy: its name, help line, the trainable config part it runs with, its tasks.

    ``config(args, policy_name)`` returns ``meta``, ``meta_config`` and any top-level keys (an lr
    schedule for a baseline, ``metric_reduction``...).
    """

    name: str
    help: str
    config: Callable[[argparse.Namespace, str], dict[str, Any]]
    tasks: tuple[str, ...] | None = None  # tasks it makes sense on (None: all)


def _preset_config(spec: StrategySpec, args: argparse.Namespace, policy_name: str) -> dict[str, Any]:
    # Heuristic strategies decide once per evaluation (the trainable's default update_frequency),
    # on the validation loss where their spec says so; patience counts evaluations.
    config = spec.preset_config(PresetContext(args.eval_interval, patience=2, policy_name=policy_name))
    if spec.family == "rl":
        # The policy acts on a schedule (anchored actions): untrained it is that schedule.
        config["schedule"] = args.rl_base
    return config


def strategies() -> dict[str, Strategy]:
    """The CLI's strategies: every registered strategy with preset settings
    (:func:`ray_metaopt.registry.register_strategy`), and ``cosine``, the schedule baseline."""
    out: dict[str, Strategy] = {}
    for spec in preset_strategies():
        out[spec.name] = Strategy(spec.name, spec.summary, functools.partial(_preset_config, spec), spec.tasks)
        if spec.name == "none":
            out["cosine"] = Strategy(
                "cosine",
                "no meta-optimizer, a cosine lr schedule to zero: the schedule baseline",
                lambda args, policy_name: {"meta": "none", "meta_config": {}, "schedule": "cosine"},
            )
    return out


def _uses_rl(name: str) -> bool:
    """Whether strategy ``name`` learns through the run's shared policy actor (``rl`` does;
    ``rl_pretrained`` acts with a shipped policy, frozen, and needs none)."""
    spec = strategy_spec(name)
    if spec is None or spec.family != "rl":
        return False
    if spec.preset is None:
        return True  # a registered RL strategy without presets: assume it learns (as before)
    preset = spec.preset_config(PresetContext(20, policy_name="probe"))
    return "shared_policy" in preset["meta_config"]


def __getattr__(name: str) -> Any:
    # ``STRATEGIES`` reads the registry when asked, so strategies registered later show up too.
    if name == "STRATEGIES":
        return strategies()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- arguments
def _strategy_list(values: Sequence[str]) -> list[str]:
    names: list[str] = []
    for value in values:
        names.extend(v.strip() for v in value.split(",") if v.strip())
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ray-metaopt",
        description=(
            "Compare meta-optimization strategies (hyperparameters adjusted while training) on a "
            "built-in task with Ray Tune. Without arguments: a local Ray, the teacher_student "
            "task, strategies " + ", ".join(DEFAULT_STRATEGIES) + "; then a results table and a PNG."
        ),
        epilog=(
            "subcommands:\n  run      the comparison described above (the default: `ray-metaopt run` = `ray-metaopt`)\n"
            "  bench    the benchmark suite (ray-metaopt bench --help)\n"
            "  train-policy  train one RL policy on several tasks through one shared actor, with a card "
            "(ray-metaopt train-policy --help)\n\n"
            "strategies:\n" + "\n".join(f"  {name:<18} {s.help}" for name, s in strategies().items())
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_ray_arguments(parser.add_argument_group("Ray"))
    exp = parser.add_argument_group("experiment")
    exp.add_argument(
        "--task",
        default="teacher_student",
        help=f"built-in or registered task (built-ins: {', '.join(TASKS)})",
    )
    exp.add_argument(
        "--strategies",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"strategies to compare, space or comma separated (default: {' '.join(DEFAULT_STRATEGIES)}; "
        f"choices: {', '.join(strategies())})",
    )
    exp.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="seeds per strategy: --seed, --seed+1, ... (default 2; smoke 1)",
    )
    exp.add_argument(
        "--max-steps", type=int, default=None, help="training steps per trial (default 1500; smoke 60)"
    )
    exp.add_argument(
        "--eval-interval", type=int, default=None, help="steps between evaluations (default 50; smoke 10)"
    )
    exp.add_argument("--batch-size", type=int, default=None, help="batch size (default: the trainable's)")
    exp.add_argument("--optimizer", default="adamw", help="torch optimizer name (default adamw)")
    exp.add_argument("--lr", type=float, default=1e-2, help="initial learning rate (default 1e-2)")
    exp.add_argument("--weight-decay", type=float, default=1e-4, help="initial weight decay (default 1e-4)")
    exp.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    exp.add_argument(
        "--scheduler",
        choices=("fifo", "asha"),
        default="fifo",
        help="Tune scheduler under the meta-aware one that stops diverged trials (default fifo)",
    )
    exp.add_argument(
        "--policy-name", default=None, help="name of the shared RL policy actor (default: unique per run)"
    )
    exp.add_argument(
        "--rl-base",
        choices=("cosine", "linear", "constant"),
        default="cosine",
        help="the lr schedule the rl strategy's actions multiply (default cosine, like the cosine strategy)",
    )
    exp.add_argument("--smoke", action="store_true", help="a tiny run: few steps, for CI and a first try")
    out = parser.add_argument_group("output")
    out.add_argument(
        "--output",
        default="./ray_metaopt_results",
        help="directory for the table, trajectories and PNG (default ./ray_metaopt_results)",
    )
    out.add_argument(
        "--storage-path",
        default=None,
        help="Tune storage_path (local dir or URI such as s3://...; default <output>/tune)",
    )
    out.add_argument("--name", default=None, help="experiment name (default metaopt_<time>)")
    out.add_argument("--no-plot", action="store_true", help="skip the PNG")
    out.add_argument(
        "--verbose", type=int, default=1, choices=(0, 1, 2), help="Tune's output verbosity (default 1)"
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = _strategy_list(args.strategies) if args.strategies is not None else list(DEFAULT_STRATEGIES)
    known = strategies()
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(
            f"unknown strategy {', '.join(map(repr, unknown))}; choose from: {', '.join(known)}"
        )
    if not names:
        parser.error(f"--strategies is empty; choose from: {', '.join(known)}")
    names = list(dict.fromkeys(names))
    for name in names:
        tasks = known[name].tasks
        if tasks is not None and args.task not in tasks:
            parser.error(f"strategy {name!r} needs --task {' or '.join(tasks)}, got --task {args.task}")
    args.strategy_names = names
    from ray_metaopt.tune import available_optimizers, available_tasks

    if ":" not in args.task and args.task not in available_tasks():
        parser.error(
            f"unknown task {args.task!r}; choose from: {', '.join(available_tasks())} (or 'module:attr')"
        )
    if ":" not in args.optimizer and args.optimizer.lower() not in available_optimizers():
        parser.error(
            f"unknown optimizer {args.optimizer!r}; choose from: {', '.join(available_optimizers())}"
        )
    if args.num_samples is None:
        args.num_samples = 1 if args.smoke else 2
    if args.max_steps is None:
        args.max_steps = 60 if args.smoke else 1500
    if args.eval_interval is None:
        args.eval_interval = 10 if args.smoke else 50
    for flag in ("num_samples", "max_steps", "eval_interval"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.eval_interval > args.max_steps:
        parser.error(f"--eval-interval ({args.eval_interval}) must be <= --max-steps ({args.max_steps})")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be a positive finite number, got {args.lr}")
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        parser.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0:
        parser.error(
            f"--cpus-per-trial must be > 0 and --gpus-per-trial >= 0, got {args.cpus_per_trial} and {args.gpus_per_trial}"
        )
    if args.num_cpus is not None and args.address is not None:
        parser.error("--num-cpus sizes the local Ray; it cannot be used with --address")
    return args


# ----------------------------------------------------------------------------- the experiment
STRATEGY_KEY = "_strategy"  # the trainable leaves keys starting with "_" to the user


def build_param_space(args: argparse.Namespace, policy_name: str) -> dict[str, Any]:
    """Tune ``param_space`` for the provided trainable: a grid over strategies (and seeds).

    Each strategy's ``meta``/``meta_config`` (and extras such as ``schedule``) follow its name in
    ``config["_strategy"]``; a key one strategy sets and another does not gets the trainable's
    default for the other.
    """
    from ray import tune

    from ray_metaopt.tune.search_space import preset_grid

    known = strategies()
    grid = preset_grid({name: known[name].config(args, policy_name) for name in args.strategy_names}, STRATEGY_KEY)
    space: dict[str, Any] = {
        STRATEGY_KEY: grid.pop(STRATEGY_KEY),
        "task": args.task,
        "optimizer": args.optimizer,
        "optimizer_config": {"lr": args.lr, "weight_decay": args.weight_decay},
        "max_steps": args.max_steps,
        "eval_interval": args.eval_interval,
        # A checkpoint every 10 evaluations (and at the end) is plenty for a short comparison.
        "checkpoint_interval": 10,
        # Every strategy trains with the same seeds: a paired comparison.
        "seed": tune.grid_search(list(range(args.seed, args.seed + args.num_samples)))
        if args.num_samples > 1
        else args.seed,
    }
    if args.batch_size is not None:
        space["batch_size"] = args.batch_size
    space.update(grid)  # each strategy's keys (meta, meta_config, schedule...)
    return space


def _error_summary(error: BaseException) -> str:
    """``"KeyError: ..."`` of the exception a trial raised (Ray wraps it with a traceback)."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        error = cause
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return f"{type(error).__name__}: {text}"[:500]


def _result_rows(grid: Any, scheduler: Any) -> list[dict[str, Any]]:
    rows = []
    stopped = getattr(scheduler, "stopped_trials", {})
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or {}
        trial_id = metrics.get("trial_id")
        if result.error is not None:
            status = "ERROR"
        elif trial_id in stopped:
            status = "stopped: " + stopped[trial_id].split(":", 1)[0]
        elif metrics.get("diverged"):
            status = "diverged"
        else:
            status = "done"
        rows.append(
            {
                "strategy": config.get(STRATEGY_KEY, config.get("meta")),
                "seed": config.get("seed"),
                "trial_id": trial_id,
                "status": status,
                "steps": metrics.get("step"),
                "final_val_loss": metrics.get("val_loss"),
                "best_val_loss": metrics.get("best_val_loss"),
                "final_lr": metrics.get("lr"),
                "decisions": metrics.get("meta/num_decisions"),
                "steps_per_second": metrics.get("steps_per_second"),
                "error": None if result.error is None else _error_summary(result.error),
                "noise_floor": next(
                    (
                        v
                        for k, v in metrics.items()
                        if k.endswith("/val_noise_floor") and isinstance(v, (int, float))
                    ),
                    None,
                ),
            }
        )
    order = {name: i for i, name in enumerate(strategies())}
    rows.sort(key=lambda r: (order.get(r["strategy"], 99), r["seed"] if r["seed"] is not None else 0))
    return rows


def _text_table(headers: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """A plain-text table: left-aligned columns as wide as their widest cell, a rule under the header."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table: strategy, seed, status, final/best val_loss, decisions, steps/s."""
    headers = [
        "strategy",
        "seed",
        "status",
        "steps",
        "final val_loss",
        "best val_loss",
        "final lr",
        "decisions",
        "steps/s",
    ]
    lines = [
        [
            _fmt(r["strategy"]),
            _fmt(r["seed"]),
            _fmt(r["status"]),
            _fmt(r["steps"]),
            _fmt(r["final_val_loss"]),
            _fmt(r["best_val_loss"]),
            _fmt(r["final_lr"], ".3g"),
            _fmt(r["decisions"]),
            _fmt(r["steps_per_second"], ".1f"),
        ]
        for r in rows
    ]
    return _text_table(headers, lines)


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per strategy: trials, finished trials, mean/std of final and best val_loss, mean decisions."""
    import statistics

    out = []
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        mine = [r for r in rows if r["strategy"] == strategy]
        done = [r for r in mine if r["status"] == "done" and isinstance(r["best_val_loss"], (int, float))]
        entry: dict[str, Any] = {"strategy": strategy, "trials": len(mine), "done": len(done)}
        for key in ("final_val_loss", "best_val_loss", "decisions"):
            values = [float(r[key]) for r in done if isinstance(r[key], (int, float))]
            entry[f"{key}_mean"] = statistics.fmean(values) if values else None
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        out.append(entry)
    return out


def format_summary(summary: Sequence[dict[str, Any]]) -> str:
    headers = ["strategy", "done", "final val_loss (mean +- std)", "best val_loss (mean +- std)", "decisions"]

    def pm(entry: dict[str, Any], key: str) -> str:
        mean, std = entry[f"{key}_mean"], entry[f"{key}_std"]
        return "-" if mean is None else f"{mean:.4g}" + (f" +- {std:.2g}" if std is not None else "")

    lines = [
        [
            str(e["strategy"]),
            f"{e['done']}/{e['trials']}",
            pm(e, "final_val_loss"),
            pm(e, "best_val_loss"),
            _fmt(e["decisions_mean"], ".1f"),
        ]
        for e in summary
    ]
    return _text_table(headers, lines)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _write_results(output: str, rows: list[dict[str, Any]], extra: dict[str, Any]) -> tuple[str, str]:
    import csv

    csv_path = os.path.join(output, "results.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["strategy"])
        writer.writeheader()
        writer.writerows(rows)
    json_path = os.path.join(output, "results.json")
    with open(json_path, "w") as f:
        json.dump({"trials": rows, **extra}, f, indent=1, default=_json_default)
    return csv_path, json_path


def run(args: argparse.Namespace) -> int:
    """Run the comparison experiment described by parsed ``args``; returns the exit status."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from ray_metaopt.tune import trainable_with_resources
    from ray_metaopt.tune.callbacks import MetaOptCallback
    from ray_metaopt.tune.plotting import MissingPlotDependency, plot_trajectories
    from ray_metaopt.tune.scheduler import MetaAwareScheduler

    output = os.path.abspath(args.output)
    os.makedirs(output, exist_ok=True)
    storage_path = args.storage_path or os.path.join(output, "tune")
    if "://" not in storage_path:
        storage_path = os.path.abspath(storage_path)
    name = args.name or time.strftime("metaopt_%Y%m%d_%H%M%S")
    uses_rl = any(_uses_rl(n) for n in args.strategy_names)
    policy_name = args.policy_name or f"ray_metaopt_cli_{uuid.uuid4().hex[:8]}"

    started_ray = init_ray(args.address, args.num_cpus)
    try:
        callback = MetaOptCallback(
            policy_name=policy_name if uses_rl else None,
            policy_config={"seed": args.seed} if uses_rl else None,
            policy_save_path=os.path.join(output, "policy.pt") if uses_rl else None,
            trajectory_dir=os.path.join(output, "trajectories"),
            stats_interval_s=5.0,
        )
        num_reports = math.ceil(args.max_steps / args.eval_interval)
        base = (
            ASHAScheduler(
                time_attr="training_iteration", max_t=num_reports, grace_period=max(1, num_reports // 4)
            )
            if args.scheduler == "asha"
            else FIFOScheduler()
        )
        scheduler = MetaAwareScheduler(base, stop_on_divergence=True)
        resources = {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}
        tuner = tune.Tuner(
            trainable_with_resources(resources),
            param_space=build_param_space(args, policy_name),
            tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                callbacks=[callback],
                verbose=args.verbose,
            ),
        )
        print(
            f"ray-metaopt: {len(args.strategy_names)} strategies x {args.num_samples} sample(s) on task "
            f"{args.task!r}, {args.max_steps} steps each; Ray {'at ' + args.address if args.address else 'local'}",
            flush=True,
        )
        start = time.monotonic()
        grid = tuner.fit()
        elapsed = time.monotonic() - start

        rows = _result_rows(grid, scheduler)
        print()
        print(f"Results ({len(rows)} trials, {elapsed:.0f}s):")
        print(format_table(rows))
        summary = summarize(rows)
        if args.num_samples > 1:
            print(f"\nPer strategy ({args.num_samples} seeds each):")
            print(format_summary(summary))
        floors = [r["noise_floor"] for r in rows if r["noise_floor"] is not None]
        if floors:
            print(f"\n{args.task} noise floor (the lowest val_loss possible): {floors[0]:.4g}")
        extra = {
            "summary": summary,
            "experiment_path": grid.experiment_path,
            "task": args.task,
            "max_steps": args.max_steps,
            "wall_seconds": elapsed,
            "policy_stats": callback.policy_stats,
            "policy_path": callback.saved_policy_path,
        }
        csv_path, json_path = _write_results(output, rows, extra)
        print(f"\nresults: {csv_path} (and {os.path.basename(json_path)})")
        print(f"trajectories: {os.path.join(output, 'trajectories')}")
        if callback.policy_stats:
            s = callback.policy_stats
            print(
                f"shared policy: version {s.get('policy/version')}, {s.get('policy/updates')} updates, "
                f"{s.get('rollouts/transitions')} transitions; saved to {callback.saved_policy_path}"
            )
        if not args.no_plot:
            try:
                png = plot_trajectories(
                    callback.trajectories.values(),
                    os.path.join(output, "lr_loss.png"),
                    title=f"ray-metaopt: {args.task}",
                    loss_floor=floors[0] if floors else None,
                )
                print(f"plot: {png}")
            except MissingPlotDependency as e:
                print(f"plot skipped: {e}")
        errored = [r for r in rows if r["status"] == "ERROR"]
        for r in errored:
            print(f"trial {r['trial_id']} ({r['strategy']}) failed: {r['error']}", file=sys.stderr)
        if not rows or errored:
            return 1
        return 0
    finally:
        if started_ray:
            ray.shutdown()


def bench(argv: Sequence[str]) -> int:
    """``ray-metaopt bench``: the benchmark suite (:func:`ray_metaopt.bench.main`)."""
    from ray_metaopt.bench import main as bench_main

    return bench_main(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ray-metaopt`` console command.

    Args:
        argv: the arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        The exit status: 0 when every trial finished (stopping a diverged trial is a finish), 1
        when a trial errored, 2 for bad arguments (argparse exits with 2 itself).

    Example:
        >>> main(["--smoke", "--strategies", "none", "plateau", "--output", "/tmp/metaopt"])  # doctest: +SKIP
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # Subcommands by their first word: argparse has no default subcommand, and plain
    # `ray-metaopt [options]` must stay the main job.
    if argv and argv[0] == "bench":
        return bench(argv[1:])
    if argv and argv[0] == "train-policy":
        from .bench.pretrain import main as train_policy_main

        return train_policy_main(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    args = parse_args(argv)
    return run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
