"""``ray-metaopt train-policy``: one RL policy trained through one shared actor on several tasks.

Each training trial runs the benchmark's RL arm (the policy acting on the tuned cosine schedule,
with a paired reference: the trial first runs that schedule alone at the same seed and lr) at an
initial lr spread around the task's tuned lr, ``REFERENCE_LRS[task] x factor``. The trials of
every task feed one :class:`~ray_metaopt.rl.PolicyActor`, seed-major (every task and lr early
and late), and the policy is saved with a card (``<output stem>.md``) that says what it was
trained on, with which command, and what its training episodes gained over their references.

Example:
    ray-metaopt train-policy --tasks teacher_student mnist1d --output policy.pt --num-cpus 2
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from .analysis import _rl_result
from .arms import REFERENCE_LR_FACTORS, REFERENCE_LRS, SUITE_SIZES, ArmContext, SuiteSize, trial_config
from .report import machine_info
from .runner import _TRAIN_ARM, Runner, TrialRecord, _policy_part
from ..tune.session import add_ray_arguments, init_ray

DEFAULT_TASKS = ("teacher_student", "mnist1d")
LR_FACTORS = REFERENCE_LR_FACTORS
FIRST_SEED = 1000  # training seeds: far from the benchmark's evaluation seeds (0-4, 200-204, ...)


def training_configs(
    size: SuiteSize, tasks: Sequence[str], seeds: Sequence[int], factors: Sequence[float], policy_name: str
) -> list[dict[str, Any]]:
    """The trainable configs of the training trials, seed-major: each seed runs every task at every lr."""
    configs = []
    for seed in seeds:
        for task in tasks:
            for factor in factors:
                config = trial_config(
                    _TRAIN_ARM, ArmContext(task, size, REFERENCE_LRS[task] * factor, seed), phase="rl_train"
                )
                config["meta_config"] = {**config["meta_config"], "shared_policy": policy_name}
                config["paired_reference"] = True
                configs.append(config)
    return configs


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        if out.returncode == 0:
            return out.stdout.strip()
    return None


def _fmt(x: float) -> str:
    return f"{x:+.3f}" if math.isfinite(x) else "–"


def render_card(card: Mapping[str, Any]) -> str:
    """The policy card (Markdown) from the plain data :func:`train_policy` returns."""
    stats = card["policy_stats"]
    lines = [
        f"# Policy card: `{card['name']}`",
        "",
        f"Trained {card['date']} at commit {card['commit'] or 'unknown'} in {card['wall_seconds'] / 60:.1f} min on "
        f"{card['machine'].get('cpu', '?')} ({card['machine'].get('cores', '?')} cores):",
        "",
        "```bash",
        card["command"],
        "```",
        "",
        f"- Tasks: {', '.join(f'`{t}`' for t in card['tasks'])}; every other built-in task is held out.",
        f"- Initial lrs: each task's tuned cosine lr x {list(card['lr_factors'])} "
        f"({', '.join(f'`{t}` {REFERENCE_LRS[t]:g}' for t in card['tasks'])}).",
        f"- Training seeds: {card['seeds'][0]}-{card['seeds'][-1]} ({len(card['seeds'])} seeds); "
        f"{card['episodes']} episodes, each after its paired reference (the base schedule alone at the same "
        "seed and lr), through one shared policy actor.",
        f"- Policy: {card['policy']}, acting on the cosine schedule every {card['update_every']} steps.",
        f"- After training: version {stats.get('policy/version', '–')}, {stats.get('policy/updates', '–')} "
        f"REINFORCE updates from {stats.get('rollouts/transitions', '–')} transitions, entropy "
        f"{stats.get('policy/entropy', math.nan):.3f}.",
        "",
        "Return of an episode minus its paired reference's (log-loss drops, train + val; above 0: the "
        "policy's lr changes beat following the schedule), mean per round of training seeds:",
        "",
        "| task | first round | last round | first half | last half |",
        "|---|---|---|---|---|",
    ]
    for task, curve in card["learning_curves"].items():
        lines.append(
            f"| `{task}` | {_fmt(curve['first_round'])} | {_fmt(curve['last_round'])} | "
            f"{_fmt(curve['first_half'])} | {_fmt(curve['last_half'])} |"
        )
    lines += [
        "",
        "These are training figures. What the policy does on seeds and tasks it has not seen is measured "
        "with `ray-metaopt bench --rl-policy-from <this file> --rl-tasks ...` (see `benchmarks/RESULTS.md`).",
        "",
    ]
    return "\n".join(lines)


def train_policy(
    output: str,
    *,
    tasks: Sequence[str] = DEFAULT_TASKS,
    seeds: Sequence[int] = tuple(range(FIRST_SEED, FIRST_SEED + 12)),
    lr_factors: Sequence[float] = LR_FACTORS,
    size: SuiteSize = SUITE_SIZES["quick"],
    storage_path: str | None = None,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
    command: str = "ray-metaopt train-policy",
    progress: Any = print,
) -> dict[str, Any]:
    """Train one policy on ``tasks`` through one shared actor (Ray must be connected); save it to ``output``.

    Args:
        output: the policy file to write (its card goes beside it, ``.md``).
        tasks: built-in tasks of ``size`` with a reference lr (:data:`REFERENCE_LRS`).
        seeds: training seeds (keep them off the benchmark's evaluation seeds).
        lr_factors: initial lrs, as factors of each task's reference lr.
        size: the suite size whose task configs, budgets and policy settings the trials use.
        storage_path: Tune's storage (default: a temporary directory, removed after).
        cpus_per_trial, gpus_per_trial: resources of one trial.
        command: the command line recorded in the card.
        progress: called with a line of text per finished experiment.

    Returns:
        The card as plain data (also written as Markdown beside ``output``).
    """
    import ray

    from ..tune.callbacks import MetaOptCallback

    unknown = [t for t in tasks if t not in REFERENCE_LRS or t not in size.tasks]
    if unknown or not tasks:
        raise ValueError(f"tasks must be among {sorted(REFERENCE_LRS)}, got tasks={list(tasks)}")
    if not seeds or not lr_factors or any(not (math.isfinite(f) and f > 0) for f in lr_factors):
        raise ValueError(f"seeds and lr_factors must be non-empty, factors finite and > 0, got {list(seeds)}, {list(lr_factors)}")
    output = os.path.abspath(output)
    policy_name = f"train_policy_{uuid.uuid4().hex[:8]}"
    size = size.with_(tasks=tuple(tasks), rl_tasks=tuple(tasks), rl_paired_reference=True)
    callback = MetaOptCallback(
        policy_name=policy_name,
        policy_config={**_policy_part(size.policy()), "seed": 0},
        policy_save_path=output,
        stats_interval_s=2.0,
        write_interval_s=3600.0,
    )
    temporary = storage_path is None
    storage = storage_path or tempfile.mkdtemp(prefix="ray_metaopt_train_policy_")
    started = time.monotonic()
    runner = Runner(size, storage, cpus_per_trial, gpus_per_trial, progress)
    try:
        runner.run_grid("train_policy", training_configs(size, tasks, seeds, lr_factors, policy_name), [callback])
    finally:
        if callback.policy_actor is not None:
            with contextlib.suppress(Exception):
                ray.kill(callback.policy_actor)
        if temporary:
            shutil.rmtree(storage, ignore_errors=True)
    errors = [r for r in runner.records if r.status == "error"]
    if callback.saved_policy_path is None:
        raise RuntimeError(f"the policy could not be saved to {output!r} ({len(errors)} trials errored)")
    card = {
        "name": os.path.splitext(os.path.basename(output))[0],
        "date": datetime.date.today().isoformat(),
        "commit": _git_commit(),
        "command": command,
        "machine": machine_info(),
        "wall_seconds": time.monotonic() - started,
        "tasks": list(tasks),
        "lr_factors": list(lr_factors),
        "seeds": list(seeds),
        "episodes": len(runner.records),
        "errored_episodes": len(errors),
        "policy": _policy_part(size.policy()),
        "update_every": size.rl_update_every,
        "policy_stats": {k: v for k, v in (callback.policy_stats or {}).items() if isinstance(v, (int, float, str))},
        "learning_curves": learning_curves(runner.records, size),
    }
    with open(os.path.splitext(output)[0] + ".md", "w") as f:
        f.write(render_card(card))
    return card


def learning_curves(records: Sequence[TrialRecord], size: SuiteSize) -> dict[str, dict[str, float]]:
    """Per task: the episodes' mean paired advantage in the first / last round and half of the seeds."""
    out = {}
    for task in size.tasks:
        rl = _rl_result(task, records, size, [], {})
        if rl is not None and rl.episodes:
            out[task] = {
                "first_round": rl.first_round_mean,
                "last_round": rl.last_round_mean,
                "first_half": rl.first_half_mean,
                "last_half": rl.last_half_mean,
            }
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ray-metaopt train-policy",
        description=(
            "Train one RL lr policy through one shared policy actor on built-in tasks, at initial lrs spread "
            "around each task's tuned lr, and save it with a card (what it was trained on, the command, the "
            "training figures)."
        ),
    )
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=sorted(REFERENCE_LRS), metavar="TASK",
                        help=f"tasks to train on (default: {' '.join(DEFAULT_TASKS)}; choices: {', '.join(sorted(REFERENCE_LRS))})")
    parser.add_argument("--seeds", type=int, default=12, help="training seeds (default 12)")
    parser.add_argument("--first-seed", type=int, default=FIRST_SEED, help=f"first training seed (default {FIRST_SEED})")
    parser.add_argument("--lr-factors", nargs="+", type=float, default=list(LR_FACTORS), metavar="F",
                        help=f"initial lrs as factors of each task's tuned lr (default {' '.join(map(str, LR_FACTORS))})")
    parser.add_argument("--output", default="policy.pt", help="policy file to write; the card goes beside it (.md)")
    parser.add_argument("--storage-path", default=None, help="Tune storage_path (default: a temporary directory, removed after)")
    add_ray_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ray-metaopt train-policy``; 0 when the policy was saved with no trial errored."""
    import ray

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.first_seed < 0:
        parser.error(f"--seeds must be >= 1 and --first-seed >= 0, got {args.seeds}, {args.first_seed}")
    if any(not (math.isfinite(f) and f > 0) for f in args.lr_factors):
        parser.error(f"--lr-factors must be finite and > 0, got {args.lr_factors}")
    if args.num_cpus is not None and args.address is not None:
        parser.error("--num-cpus sizes the local Ray; it cannot be used with --address")
    started_ray = init_ray(args.address, args.num_cpus, log_to_driver=False)
    try:
        card = train_policy(
            args.output,
            tasks=args.tasks,
            seeds=tuple(range(args.first_seed, args.first_seed + args.seeds)),
            lr_factors=args.lr_factors,
            storage_path=args.storage_path,
            cpus_per_trial=args.cpus_per_trial,
            gpus_per_trial=args.gpus_per_trial or 0.0,
            command=" ".join(["ray-metaopt train-policy", shlex.join(argv)]).strip(),
            progress=lambda line: print(line, flush=True),
        )
    finally:
        if started_ray:
            ray.shutdown()
    print(f"policy: {os.path.abspath(args.output)} (card: {os.path.splitext(os.path.abspath(args.output))[0]}.md), "
          f"{card['episodes']} episodes in {card['wall_seconds'] / 60:.1f} min")
    return 1 if card["errored_episodes"] else 0


__all__ = ["DEFAULT_TASKS", "LR_FACTORS", "REFERENCE_LRS", "main", "render_card", "train_policy", "training_configs"]
