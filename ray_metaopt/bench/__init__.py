"""``ray-metaopt bench``: does meta-optimization pay off, and does the shared RL policy learn?

Runs every arm of :mod:`~ray_metaopt.bench.arms` (fixed and cosine lr tuned over a grid, torch's
ReduceLROnPlateau, Tune's PBT, the heuristic meta-optimizers, the MoE router treatments and
expert/gate strategies, the RL policy and its controls) on the built-in tasks with paired seeds,
on Ray Tune, then writes ``RESULTS.md``, PNG plots and the raw records (``results.json``).

Examples::

    ray-metaopt bench --quick                  # 2 CPUs, about 20 minutes; writes ./benchmarks/
    ray-metaopt bench --quick --tasks charlm   # one task of the size (here the Shakespeare LM)
    ray-metaopt bench                          # the full size, for a GPU machine or a cluster
    ray-metaopt bench --address auto --storage-path s3://bucket/bench
    ray-metaopt bench --report-only benchmarks/results.json   # redo tables and plots only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, fields
from typing import Any, Sequence

from .analysis import analyze
from .arms import RL_TRAIN_LRS, SUITE_SIZES, SuiteSize, arms_for, lrs_for
from .report import command_line, machine_info, render_report
from ..tune.session import add_ray_arguments, init_ray
from .runner import SuiteRun, TrialRecord, run_suite

RESULTS_JSON = "results.json"
RESULTS_MD = "RESULTS.md"


def size_to_dict(size: SuiteSize) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(size).items()}


def size_from_dict(data: dict[str, Any]) -> SuiteSize:
    kwargs = {}
    for f in fields(SuiteSize):
        if f.name in data:
            value = data[f.name]
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return SuiteSize(**kwargs)


def planned_trials(size: SuiteSize) -> int:
    """How many Tune trials a run of ``size`` starts (for the progress message)."""
    total = 0
    for task in size.tasks:
        for arm in arms_for(task, size):
            if arm.family == "pbt":
                total += arm.population * len(size.pbt_seeds or size.seeds)
            else:
                total += len(lrs_for(arm, task, size)) * len(size.seeds)
        if task in size.rl_tasks and size.rl_policy_path is None:
            total += sum(len(size.train_lrs(seed, task)) for seed in size.rl_train_seeds)
    return total


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ray-metaopt bench",
        description=(
            "Benchmark the meta-optimizers against tuned fixed/cosine lrs, torch ReduceLROnPlateau and Tune PBT "
            "on the built-in tasks (paired seeds, Ray Tune), then write RESULTS.md, PNGs and results.json."
        ),
    )
    parser.add_argument("--quick", action="store_true", help=f"the 2-CPU size ({', '.join(SUITE_SIZES['quick'].tasks)}; about 20 minutes); default: the full size (a GPU machine)")
    parser.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help=f"run only these tasks of the size (quick: {' '.join(SUITE_SIZES['quick'].tasks)}; full: {' '.join(SUITE_SIZES['full'].tasks)})")
    parser.add_argument("--seeds", type=int, default=None, help="number of evaluation seeds (default: the size's, 5 quick / 10 full)")
    parser.add_argument(
        "--first-seed", type=int, default=None,
        help="first evaluation seed; the seeds are FIRST_SEED, FIRST_SEED+1, ... (default 0). The quick "
        "size's design was made on seeds 0-4: pass e.g. --first-seed 200 for seeds no design choice has seen",
    )
    parser.add_argument(
        "--no-pbt", action="store_true",
        help="skip the PBT phase (at the quick size about 4.5 of its 21 minutes), e.g. to study the RL arms",
    )
    parser.add_argument(
        "--output", default=None,
        help="directory for RESULTS.md, PNGs, results.json (default ./benchmarks; with --report-only, the "
             "results file's own directory)",
    )
    parser.add_argument(
        "--rl-reward", choices=("own", "paired"), default=None,
        help="RL training reward: 'own' (the episode's log-loss drops) or 'paired' (against its base schedule "
        "run first at the same seed: twice the training steps); default: the size's",
    )
    parser.add_argument(
        "--rl-train-lrs", choices=RL_TRAIN_LRS, default=None,
        help="initial lrs of the RL training episodes: 'grid' (every lr of the grid) or 'stratified' (one "
        "log-uniform draw in each grid-wide stratum per training seed) or 'dense' (the grid and its geometric "
        "midpoints) or 'reference' (0.3x-3x each task's tuned lr found on seeds 0-4, as train-policy); default: the size's",
    )
    parser.add_argument(
        "--rl-policy-from", default=None, metavar="POLICY_FILE",
        help="evaluate this saved policy on the RL tasks instead of training one (a transfer test; its "
        "settings come from the file)",
    )
    parser.add_argument(
        "--rl-tasks", nargs="+", default=None, metavar="TASK",
        help="the tasks the RL arms run on (among --tasks); default: the size's",
    )
    parser.add_argument(
        "--rl-policy", nargs="+", default=None, metavar="KEY=VALUE",
        help="override the RL arms' policy settings (RLMetaOptimizer arguments), e.g. gamma=1.0 return_horizon=100",
    )
    add_ray_arguments(
        parser,
        address_help="Ray cluster to run on ('auto', 'host:6379'); default: start a local Ray. On several nodes, "
        "pass a --storage-path every node can read (the trained policy is saved there).",
        gpus_default=None,
        gpus_help="GPUs per trial (default: the size's, 0.25 in the full size, when the cluster has GPUs; 0 otherwise)",
    )
    parser.add_argument("--storage-path", default=None, help="Tune storage_path (default: a temporary directory, removed after)")
    parser.add_argument("--keep-tune-dir", action="store_true", help="keep the temporary Tune directory")
    parser.add_argument("--report-only", default=None, metavar="RESULTS_JSON", help="rewrite the report and plots from a results.json")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    return parser


def _policy_overrides(parser: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (values as Python literals) naming ``RLMetaOptimizer`` arguments."""
    import ast

    from ..rl import RLMetaOptimizer
    from ..training.builders import accepted_kwargs

    accepted = accepted_kwargs(RLMetaOptimizer) or set()
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in accepted:
            parser.error(f"--rl-policy takes KEY=VALUE with KEY an RLMetaOptimizer argument, got {item!r}")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def _saved_policy(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The settings of the policy file at ``path`` (checked now, before any trial starts)."""
    from ..rl.persistence import load_policy

    try:
        config = dict(load_policy(path)["config"])
    except (OSError, ValueError, TypeError) as exc:
        parser.error(f"--rl-policy-from {path!r}: {exc}")
    config.pop("seed", None)
    return config


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, SuiteSize]:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    size = SUITE_SIZES["quick" if args.quick else "full"]
    if args.tasks is not None:
        unknown = [t for t in args.tasks if t not in size.tasks]
        if unknown:
            parser.error(f"--tasks {unknown} not in the {size.name} size's tasks {list(size.tasks)}")
        size = size.with_(tasks=tuple(args.tasks))
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.first_seed is not None and args.first_seed < 0:
        parser.error(f"--first-seed must be >= 0, got {args.first_seed}")
    if args.seeds is not None or args.first_seed is not None:
        count = args.seeds if args.seeds is not None else len(size.seeds)
        first = args.first_seed if args.first_seed is not None else 0
        seeds = tuple(range(first, first + count))
        clash = sorted(set(seeds) & set(size.rl_train_seeds))
        if clash:
            parser.error(f"evaluation seeds {list(seeds)} overlap the RL training seeds at {clash}: pick another --first-seed")
        size = size.with_(seeds=seeds)
    if args.no_pbt:
        size = size.with_(pbt_tasks=())
    if args.rl_policy is not None:
        size = size.with_(rl_policy={**size.rl_policy, **_policy_overrides(parser, args.rl_policy)})
    if args.rl_reward is not None:
        size = size.with_(rl_paired_reference=args.rl_reward == "paired")
    if args.rl_train_lrs is not None:
        size = size.with_(rl_train_lrs=args.rl_train_lrs)
    if args.rl_tasks is not None:
        unknown = [t for t in args.rl_tasks if t not in size.tasks]
        if unknown:
            parser.error(f"--rl-tasks {unknown} not among the tasks run, {list(size.tasks)}")
        size = size.with_(rl_tasks=tuple(args.rl_tasks))
    if args.rl_policy_from is not None:
        if args.rl_policy is not None:
            parser.error("--rl-policy cannot change a policy read with --rl-policy-from")
        size = size.with_(rl_policy_path=os.path.abspath(args.rl_policy_from), rl_policy=_saved_policy(parser, args.rl_policy_from))
    if args.cpus_per_trial <= 0 or (args.gpus_per_trial is not None and args.gpus_per_trial < 0):
        parser.error(f"--cpus-per-trial must be > 0 and --gpus-per-trial >= 0, got {args.cpus_per_trial}, {args.gpus_per_trial}")
    if args.num_cpus is not None and args.address is not None:
        parser.error("--num-cpus sizes the local Ray; it cannot be used with --address")
    return args, size


def save_results(path: str, run: SuiteRun, size: SuiteSize, extra: dict[str, Any]) -> None:
    data = {
        "format": "ray_metaopt.bench",
        "size": size_to_dict(size),
        "records": [r.to_dict() for r in run.records],
        "timings": run.timings,
        "policy_stats": run.policy_stats,
        "replay_schedules": run.replay_schedules,
        "notes": run.notes,
        "wall_seconds": run.wall_seconds,
        **extra,
    }
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=None, separators=(",", ":"), default=str)
    os.replace(tmp, path)


def load_results(path: str) -> tuple[SuiteRun, SuiteSize, dict[str, Any]]:
    with open(path) as f:
        data = json.load(f)
    if data.get("format") != "ray_metaopt.bench":
        raise ValueError(f"{path} is not a ray-metaopt bench results file (format={data.get('format')!r})")
    run = SuiteRun(
        records=[TrialRecord.from_dict(r) for r in data["records"]],
        timings=data.get("timings", {}),
        policy_stats=data.get("policy_stats", {}),
        replay_schedules=data.get("replay_schedules", {}),
        notes=data.get("notes", []),
        wall_seconds=float(data.get("wall_seconds", math.nan)),
    )
    return run, size_from_dict(data["size"]), data


def write_report(output: str, run: SuiteRun, size: SuiteSize, info: dict[str, Any], *, plots: bool = True) -> str:
    """Analyse ``run`` and write ``RESULTS.md`` (and the PNGs) into ``output``; returns the report's path."""
    results = analyze(run.records, size, replay_schedules=run.replay_schedules, policy_stats=run.policy_stats)
    paths: list[str] = []
    note = None
    if plots:
        from .plots import write_plots

        paths, note = write_plots(results, output)
    text = render_report(
        results,
        size,
        machine=info.get("machine", {}),
        machine_after=info.get("machine_after"),
        command=info.get("command", "ray-metaopt bench"),
        wall_seconds=run.wall_seconds,
        timings=run.timings,
        notes=run.notes,
        plots=paths,
        plot_note=note,
        output_dir=output,
    )
    path = os.path.join(output, RESULTS_MD)
    with open(path, "w") as f:
        f.write(text)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ray-metaopt bench``; returns 0, or 1 when a trial failed (the report is still written).

    Example:
        >>> main(["--quick", "--output", "/tmp/bench"])  # doctest: +SKIP
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args, size = _parse(argv)
    if args.output is None:  # a regenerated report goes beside its data, never over another run's
        args.output = os.path.dirname(os.path.abspath(args.report_only)) if args.report_only else "benchmarks"
    output = os.path.abspath(args.output)
    os.makedirs(output, exist_ok=True)
    if args.report_only:
        run, size, info = load_results(args.report_only)
        print(f"report: {write_report(output, run, size, info, plots=not args.no_plots)}")
        return 0

    import ray

    started_ray = init_ray(args.address, args.num_cpus, log_to_driver=False)
    temporary = args.storage_path is None
    storage = args.storage_path or tempfile.mkdtemp(prefix="ray_metaopt_bench_")
    try:
        resources = ray.cluster_resources()
        gpus = args.gpus_per_trial
        if gpus is None:
            gpus = size.gpus_per_trial if resources.get("GPU", 0) > 0 else 0.0
        info = {"machine": machine_info(), "command": command_line(argv), "cluster_resources": dict(resources)}
        print(
            f"ray-metaopt bench ({size.name}): {planned_trials(size)} trials on {', '.join(size.tasks)}; "
            f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs in Ray; "
            f"{args.cpus_per_trial:g} CPU / {gpus:g} GPU per trial",
            flush=True,
        )
        run = run_suite(
            size,
            storage_path=storage,
            cpus_per_trial=args.cpus_per_trial,
            gpus_per_trial=gpus,
            progress=lambda line: print(line, flush=True),
        )
        info["machine_after"] = machine_info()
        save_results(os.path.join(output, RESULTS_JSON), run, size, info)
        report = write_report(output, run, size, info, plots=not args.no_plots)
        errors = [r for r in run.records if r.status == "error"]
        print(f"done in {run.wall_seconds / 60:.1f} min: {report}")
        for r in errors[:10]:
            print(f"trial {r.trial_id} ({r.arm}, {r.task}, lr {r.lr}, seed {r.seed}) failed: {r.error}", file=sys.stderr)
        return 1 if errors else 0
    finally:
        if temporary and not args.keep_tune_dir:
            shutil.rmtree(storage, ignore_errors=True)
        elif temporary:
            print(f"Tune directory kept: {storage}")
        if started_ray:
            ray.shutdown()


__all__ = ["SUITE_SIZES", "SuiteSize", "analyze", "main", "run_suite", "write_report"]
