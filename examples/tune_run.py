"""Compare meta-optimizer strategies with ``tune.run`` and the provided trainable.

Every strategy trains the same built-in task from the same seeds; the table shows what each one
did to the learning rate and where the validation loss ended. ``rl_pretrained`` is the policy
that ships with the package (``anchored-cosine-v1``), frozen, acting on a cosine schedule: compare
it with ``cosine``, the same schedule alone. On its evaluation seeds it ended below the cosine
schedule at 0.5x-2x the tuned lr on every task it was measured on, the held-out charlm included
(``ray_metaopt/rl/pretrained/anchored-cosine-v1.md``); ``rl`` learns a policy from scratch
within this one run, which is too short for it to help.

Run:  python examples/tune_run.py [--smoke] [--task digits] [--address auto] [--gpus-per-trial 0.5]
Prints one JSON line: num_trials, num_errored, best_val_loss, best_strategy, per_strategy.
"""

from __future__ import annotations

import argparse
import json

from ray_metaopt.tune import trainable_with_resources

STRATEGIES = ["none", "cosine", "plateau", "advanced_plateau", "rl", "rl_pretrained"]


def strategy_configs(eval_interval: int) -> dict[str, dict]:
    """Trainable config per strategy: ``meta``, its constructor arguments (over the trainable's
    defaults: decide at every evaluation, plateau strategies watch val_loss, RL gets total_steps
    and seed from the trial) and the lr ``schedule`` it acts on."""
    return {
        "none": {"meta": "none", "meta_config": {}},
        "cosine": {"meta": "none", "meta_config": {}, "schedule": "cosine"},
        "plateau": {"meta": "plateau", "meta_config": {"patience": 2, "lr_factor": 0.5, "min_lr": 1e-5}},
        "advanced_plateau": {
            "meta": "advanced_plateau",
            "meta_config": {"patience": 2, "lr_factor": 0.5, "trend_window": 3, "min_lr": 1e-5},
        },
        "rl": {"meta": "rl", "meta_config": {"lr_actions": [0.5, 1.0, 2.0], "min_lr": 1e-5, "max_lr": 1e-1}},
        # The shipped policy decided every 10 steps between evaluations every 20: the same ratio.
        "rl_pretrained": {
            "meta": "rl_pretrained",
            "meta_config": {"update_frequency": max(1, eval_interval // 2)},
            "schedule": "cosine",
        },
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run (CI): well under a minute on 2 CPUs")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    parser.add_argument("--task", default="teacher_student", help="teacher_student, moe, digits, sequence")
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    parser.add_argument("--num-samples", type=int, default=None, help="seeds per strategy")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0)
    parser.add_argument(
        "--storage-path", default=None, help="where Tune writes results (default ~/ray_results)"
    )
    args = parser.parse_args(argv)

    import ray
    from ray import tune

    ray.init(address=args.address or "local", include_dashboard=False, log_to_driver=False)
    eval_interval = 20 if args.smoke else 50
    configs = strategy_configs(eval_interval)

    def part(key: str, default=None):
        return tune.sample_from(lambda spec: configs[spec.config["_strategy"]].get(key, default))

    config = {
        "task": args.task,
        "task_config": {"scale": 1 if args.smoke or not args.gpus_per_trial else 8},
        "optimizer": "adamw",
        "optimizer_config": {"lr": 3e-3, "weight_decay": 1e-2},
        "_strategy": tune.grid_search(args.strategies),  # keys starting with "_" are the user's
        "meta": part("meta"),
        "meta_config": part("meta_config"),
        "schedule": part("schedule", "constant"),
        "max_steps": 60 if args.smoke else 2000,
        "eval_interval": eval_interval,
        "batch_size": 64,
        "seed": tune.randint(0, 10_000),
    }
    analysis = tune.run(
        # Its own function object: tune.with_resources(metaopt_trainable) would change the shared one.
        trainable_with_resources({"cpu": 1, "gpu": args.gpus_per_trial}),
        config=config,
        num_samples=args.num_samples or (1 if args.smoke else 3),
        metric="val_loss",
        mode="min",
        storage_path=args.storage_path,
        raise_on_failed_trial=False,
        verbose=0 if args.smoke else 1,
    )

    per_strategy: dict[str, dict] = {}
    for trial in analysis.trials:
        result = trial.last_result
        if "best_val_loss" not in result:
            continue
        entry = per_strategy.setdefault(trial.config["_strategy"], {"best_val_loss": float("inf"), "trials": 0})
        entry["trials"] += 1
        entry["best_val_loss"] = min(entry["best_val_loss"], result["best_val_loss"])
        entry["final_lr"] = result["lr"]
        entry["num_decisions"] = result["meta/num_decisions"]
    if not args.smoke:
        print(f"{'strategy':<18}{'best val_loss':>14}{'final lr':>12}{'decisions':>11}")
        for name, entry in sorted(per_strategy.items(), key=lambda kv: kv[1]["best_val_loss"]):
            print(
                f"{name:<18}{entry['best_val_loss']:>14.5f}{entry['final_lr']:>12.2e}"
                f"{entry['num_decisions']:>11}"
            )
    best = min(per_strategy.items(), key=lambda kv: kv[1]["best_val_loss"], default=(None, {}))
    summary = {
        "example": "tune_run",
        "task": args.task,
        "num_trials": len(analysis.trials),
        "num_errored": sum(t.status == "ERROR" for t in analysis.trials),
        "best_val_loss": best[1].get("best_val_loss"),
        "best_strategy": best[0],
        "per_strategy": per_strategy,
    }
    ray.shutdown()
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
