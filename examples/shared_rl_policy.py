"""Several Ray Tune trials learning one RL meta-optimizer policy together.

The driver starts one :class:`~ray_metaopt.rl.PolicyActor`; every trial runs the provided
trainable with ``meta="rl"`` and ``shared_policy`` set to the actor's name. Trials act with a
local copy of the policy, send their finished decisions to the actor without waiting, and pick
up each new policy version; the actor learns from all of them (REINFORCE with a population
baseline) and checkpoints itself. At the end the policy is saved to a file that a later run can
load with ``RLMetaOptimizer(policy_path=..., frozen=True)``.

Run::

    python examples/shared_rl_policy.py --smoke          # under a minute on 2 CPUs
    python examples/shared_rl_policy.py --trials 16 --steps 2000 --address auto   # on a cluster

The last line printed is one JSON object: ``num_trials``, ``trials_with_rollouts``,
``policy_updates``, ``policy_version``, ``trials_per_node`` (by node IP) and more.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import ray
from ray import tune

from ray_metaopt.rl import save_policy, start_policy_actor
from ray_metaopt.tune import trainable_with_resources

POLICY_NAME = "shared_policy"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="4 short trials on 2 CPUs (about a minute)")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--steps", type=int, default=1000, help="training steps per trial")
    p.add_argument("--task", default="teacher_student")
    p.add_argument("--address", default=None, help="Ray address (e.g. 'auto' for a running cluster)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (ignored with --address)")
    p.add_argument("--storage", default=None, help="Tune storage path / URI (default: a temporary dir)")
    p.add_argument(
        "--checkpoint-uri", default=None, help="where the policy actor checkpoints (default: storage)"
    )
    p.add_argument("--save-policy", default=None, help="file to save the learned policy to")
    args = p.parse_args()
    if args.smoke:
        args.trials, args.steps = 4, 150
        args.num_cpus = args.num_cpus or 2
    return args


def main() -> None:
    args = parse_args()
    storage = args.storage or tempfile.mkdtemp(prefix="shared_rl_policy_")
    checkpoint_uri = args.checkpoint_uri or os.path.join(storage, "policy_actor")
    save_path = args.save_policy or os.path.join(storage, "policy.pt")

    # The same policy settings go to the actor and to every trial's RLMetaOptimizer.
    policy_config = {
        "lr_actions": [0.5, 1.0, 2.0],
        "wd_actions": [-1e-5, 0.0, 1e-5],
        "policy_lr": 1e-3,
        "entropy_weight": 0.01,
        "batch_size": 16,
        "return_horizon": 5,
    }

    started = time.perf_counter()
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(  # "local": a stale cluster file left by `ray start` is not taken for a cluster
            address="local",
            num_cpus=args.num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False
        )
    # Started by the driver, before the trials: an actor created inside a trial would live in its
    # placement group and die with it.
    actor = start_policy_actor(POLICY_NAME, policy_config=policy_config, checkpoint_uri=checkpoint_uri)

    param_space = {
        "task": args.task,
        "optimizer": "adamw",
        "optimizer_config": {"lr": 3e-3, "weight_decay": 1e-4},
        "meta": "rl",
        "meta_config": {
            **policy_config,
            "shared_policy": POLICY_NAME,
            "update_frequency": 5,
            "segment_size": 4,
        },
        "max_steps": args.steps,
        "eval_interval": max(args.steps // 5, 1),
        "seed": tune.grid_search(list(range(args.trials))),
    }
    tuner = tune.Tuner(
        trainable_with_resources({"cpu": 1}),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric="val_loss", mode="min"),
        run_config=tune.RunConfig(name="shared_rl_policy", storage_path=storage, verbose=0),
    )
    results = tuner.fit()

    # Each trial sends its last segments, without waiting, when its episode ends: let the
    # actor's count settle before reading it.
    stats = ray.get(actor.stats.remote())
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        time.sleep(1.0)
        latest = ray.get(actor.stats.remote())
        if latest["rollouts/segments"] == stats["rollouts/segments"]:
            break
        stats = latest
    ray.get(actor.checkpoint.remote())
    save_policy(save_path, actor)

    errors = sum(1 for r in results if r.error is not None)
    val_losses = [r.metrics.get("val_loss", math.nan) for r in results if r.metrics]
    best = min((v for v in val_losses if math.isfinite(v)), default=math.nan)
    per_trial = stats["rollouts/transitions_per_trial"]
    trials_per_node: dict[str, int] = {}
    for r in results:
        node = (r.metrics or {}).get("node_ip", "unknown")
        trials_per_node[node] = trials_per_node.get(node, 0) + 1
    summary = {
        "num_trials": len(results),
        "num_errored": errors,
        "trials_with_rollouts": sum(1 for n in per_trial.values() if n > 0),
        "transitions": stats["rollouts/transitions"],
        "dropped_stale": stats["rollouts/dropped_stale"],
        "version_lag_mean": round(stats["rollouts/version_lag_mean"], 3),
        "policy_updates": stats["policy/updates"],
        "policy_version": stats["policy/version"],
        "policy_entropy": None if math.isnan(stats["policy/entropy"]) else round(stats["policy/entropy"], 4),
        "best_val_loss": None if math.isnan(best) else best,
        "saved_policy": save_path,
        "trials_per_node": trials_per_node,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    ray.shutdown()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
