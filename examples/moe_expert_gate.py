"""Expert/gate strategies on a routed mixture of experts, with the provided trainable.

The built-in ``moe`` task draws inputs from clusters with different targets; its ``TinyMoE``
student is split into gate / expert / shared param groups (``moe_param_groups``), and each step
hands the strategy the routing metrics of the real router logits. The expert/gate strategies
set the gate and expert learning rates apart from what they see in the routing.

Run:  python examples/moe_expert_gate.py [--smoke] [--address auto]
Prints one JSON line: num_trials, num_errored, best_val_loss, per_strategy (val loss, routing,
final gate / expert lr).
"""

from __future__ import annotations

import argparse
import json

from ray_metaopt.tune import trainable_with_resources

STRATEGIES = ["none", "expert_gate", "smart_expert_gate"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run (CI): well under a minute on 2 CPUs")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--num-samples", type=int, default=None, help="seeds per strategy")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0)
    parser.add_argument(
        "--storage-path", default=None, help="where Tune writes results (default ~/ray_results)"
    )
    args = parser.parse_args(argv)

    import ray
    from ray import tune

    ray.init(address=args.address or "local", include_dashboard=False, log_to_driver=False)
    config = {
        "task": "moe",
        "task_config": {
            "num_clusters": args.num_experts,
            "num_experts": args.num_experts,
            "top_k": args.top_k,
            "val_size": 256 if args.smoke else 1024,
            "scale": 1 if args.smoke or not args.gpus_per_trial else 8,
        },
        "optimizer": "adamw",
        "optimizer_config": {"lr": 3e-3, "weight_decay": 1e-2},
        "meta": tune.grid_search(STRATEGIES),
        "max_steps": 60 if args.smoke else 3000,
        "eval_interval": 20 if args.smoke else 50,
        "batch_size": 64 if args.smoke else 256,
        "seed": tune.randint(0, 10_000),
    }
    tuner = tune.Tuner(
        # Its own function object: tune.with_resources(metaopt_trainable) would change the shared one.
        trainable_with_resources({"cpu": 1, "gpu": args.gpus_per_trial}),
        param_space=config,
        tune_config=tune.TuneConfig(
            metric="val_loss", mode="min", num_samples=args.num_samples or (1 if args.smoke else 3)
        ),
        run_config=tune.RunConfig(storage_path=args.storage_path, verbose=0 if args.smoke else 1),
    )
    grid = tuner.fit()  # a ResultGrid; failed trials are in grid.errors, not raised

    per_strategy: dict[str, dict] = {}
    for result in grid:
        metrics = result.metrics or {}
        if result.error is not None or "best_val_loss" not in metrics:
            continue
        entry = per_strategy.setdefault(result.config["meta"], {"best_val_loss": float("inf")})
        if metrics["best_val_loss"] < entry["best_val_loss"]:
            entry.update(
                best_val_loss=metrics["best_val_loss"],
                routing_entropy=metrics["moe/routing_entropy"],
                expert_specialization=metrics["moe/expert_specialization"],
                load_violation=metrics["moe/load_violation"],
                gate_lr=metrics["lr/gate"],
                expert_lr=metrics["lr/expert"],
                num_decisions=metrics["meta/num_decisions"],
            )
    if not args.smoke:
        print(
            f"{'strategy':<20}{'val_loss':>10}{'entropy':>9}{'special.':>9}{'gate lr':>10}{'expert lr':>11}"
        )
        for name, e in sorted(per_strategy.items(), key=lambda kv: kv[1]["best_val_loss"]):
            print(
                f"{name:<20}{e['best_val_loss']:>10.4f}{e['routing_entropy']:>9.3f}"
                f"{e['expert_specialization']:>9.3f}"
                f"{e['gate_lr']:>10.2e}{e['expert_lr']:>11.2e}"
            )
    summary = {
        "example": "moe_expert_gate",
        "num_trials": len(grid),
        "num_errored": grid.num_errors,
        "best_val_loss": min((e["best_val_loss"] for e in per_strategy.values()), default=None),
        "per_strategy": per_strategy,
    }
    ray.shutdown()
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
