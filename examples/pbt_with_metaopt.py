"""Population Based Training over a meta-optimized trial: PBT explores, the strategy adapts.

PBT mutates the configured ``optimizer_config.lr``; inside each trial a plateau strategy cuts
the lr when the validation loss stalls. When a trial exploits another, it restores the donor's
checkpoint under its own perturbed config: the perturbed lr applies (every group scaled so group 0
gets it, ratios kept) while the strategy keeps its learning state. ``reuse_actors=True`` lets
those restores happen in the running worker; pass ``--no-reuse-actors`` to see the difference.

Run:  python examples/pbt_with_metaopt.py [--smoke] [--address auto]
Prints one JSON line: num_trials, num_errored, best_val_loss, num_exploits, wall_seconds.
"""

from __future__ import annotations

import argparse
import json
import time

from ray_metaopt.tune import MetaStopper, metaopt_trainable

LRS = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run (CI): well under a minute on 2 CPUs")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    parser.add_argument("--task", default="teacher_student")
    parser.add_argument("--num-trials", type=int, default=None)
    parser.add_argument("--no-reuse-actors", action="store_true", help="start a new worker at every exploit")
    parser.add_argument(
        "--storage-path", default=None, help="where Tune writes results (default ~/ray_results)"
    )
    args = parser.parse_args(argv)

    import ray
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    ray.init(address=args.address or "local", include_dashboard=False, log_to_driver=False)
    eval_interval = 10 if args.smoke else 50
    pbt = PopulationBasedTraining(
        time_attr="training_iteration",  # one iteration = one evaluation of the trainable
        perturbation_interval=2,
        hyperparam_mutations={"optimizer_config": {"lr": LRS}},
        quantile_fraction=0.5 if args.smoke else 0.25,
        resample_probability=0.25,
        synch=args.smoke,  # in the smoke run every trial meets every perturbation point
    )
    config = {
        "task": args.task,
        "optimizer": "adamw",
        "optimizer_config": {"lr": tune.choice(LRS)},
        "meta": "plateau",
        "meta_config": {"patience": 2, "lr_factor": 0.5, "min_lr": 1e-5},
        "max_steps": 6 * eval_interval if args.smoke else 40 * eval_interval,
        "eval_interval": eval_interval,
        "batch_size": 64,
        "seed": tune.randint(0, 10_000),
    }

    class CountExploits(tune.Callback):
        """The first report after an exploit lists the configured values that replaced the donor's."""

        def __init__(self) -> None:
            self.exploits = 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.exploits += bool(result.get("config_overrides"))

    exploits = CountExploits()
    started = time.perf_counter()
    grid = tune.Tuner(
        metaopt_trainable,
        param_space=config,
        tune_config=tune.TuneConfig(
            metric="val_loss",
            mode="min",
            num_samples=args.num_trials or (2 if args.smoke else 8),
            scheduler=pbt,
            reuse_actors=not args.no_reuse_actors,
        ),
        run_config=tune.RunConfig(
            storage_path=args.storage_path,
            stop=MetaStopper(metric="val_loss", mode="min"),  # divergence; says why in stop_reason
            callbacks=[exploits],
            verbose=0 if args.smoke else 1,
        ),
    ).fit()
    wall = time.perf_counter() - started

    finished = [r for r in grid if r.error is None and "best_val_loss" in r.metrics]
    summary = {
        "example": "pbt_with_metaopt",
        "num_trials": len(grid),
        "num_errored": grid.num_errors,
        "best_val_loss": min((r.metrics["best_val_loss"] for r in finished), default=None),
        "num_exploits": exploits.exploits,
        "final_lrs": sorted(r.metrics["lr"] for r in finished),
        "stop_reasons": sorted(r.metrics.get("stop_reason", "") for r in finished),
        "reuse_actors": not args.no_reuse_actors,
        "wall_seconds": round(wall, 1),
    }
    ray.shutdown()
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
