"""Bring your own training loop: the few lines that put a meta-optimizer into your Tune trainable.

Your model, data and loop stay yours; ``ray_metaopt.tune.reporting`` adds

- ``wrap_optimizer``: your torch optimizer under a strategy (by name, as in the provided trainable);
- ``restore_from_tune`` / ``save_checkpoint``: model + optimizer + strategy state (and anything
  else, here the data RNG) in Tune checkpoints, with the PBT rule (a perturbed lr wins);
- ``report_metrics``: ``tune.report`` with the same metric names as the provided trainable
  (``lr/<group>``, ``meta/decisions``, ``best_val_loss``, ``lr_at_floor``...), so the package's
  Tune callback and scheduler work on your trainable too.

Run:  python examples/custom_trainable.py [--smoke] [--address ray://...|auto]
Prints one JSON line: num_trials, num_errored, best_val_loss, ...
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile

import torch
from torch import nn

from ray_metaopt.tune.reporting import report_metrics, restore_from_tune, save_checkpoint, wrap_optimizer


def two_spirals(n: int, noise: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved spirals in 2-D, labels 0/1 (generated: nothing to download)."""
    t = 0.5 + 3.5 * torch.rand(n, generator=generator)
    label = torch.randint(2, (n,), generator=generator)
    angle = t * math.pi + label * math.pi
    x = torch.stack([t * torch.cos(angle), t * torch.sin(angle)], dim=1) / 4
    return x + noise * torch.randn(n, 2, generator=generator), label


def train_fn(config: dict) -> None:
    """A plain Tune function trainable; the lines marked ``# metaopt`` are all it takes."""
    torch.manual_seed(config["seed"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x_val, y_val = (t.to(device) for t in two_spirals(1000, 0.05, torch.Generator().manual_seed(1234)))
    data_rng = torch.Generator().manual_seed(config["seed"])
    model = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2)).to(
        device
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])

    eval_every = config["eval_every"]
    opt = wrap_optimizer(  # metaopt
        optimizer,
        "plateau",
        {
            "patience": 2,
            "lr_factor": 0.5,
            "monitor": "val_loss",
            "update_frequency": eval_every,
            "min_lr": 1e-5,
        },
        metric_reduction="mean",
    )
    hparams = {"lr": config["lr"], "weight_decay": config["weight_decay"]}  # what PBT may perturb
    restored = restore_from_tune(model, opt, hparams=hparams)  # metaopt: {} on a fresh start
    start = restored.get("step", 0)
    if "data_rng" in restored:
        data_rng.set_state(restored["data_rng"])

    loss_sum, loss_count = 0.0, 0
    for step in range(start, config["steps"]):
        x, y = two_spirals(config["batch_size"], 0.05, data_rng)
        loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
        metrics = {"loss": loss.detach(), "grad_norm": grad_norm}
        evaluate = (step + 1) % eval_every == 0 or step + 1 == config["steps"]
        if evaluate:
            with torch.no_grad():
                logits = model(x_val)
                val_loss = nn.functional.cross_entropy(logits, y_val).item()
                accuracy = (logits.argmax(1) == y_val).float().mean().item()
            metrics["val_loss"] = val_loss
        opt.update_hyperparameters(metrics, step=step)  # metaopt
        if evaluate:
            with tempfile.TemporaryDirectory() as directory:
                save_checkpoint(
                    directory, model, opt, hparams=hparams, step=step + 1, data_rng=data_rng.get_state()
                )
                report_metrics(  # metaopt: tune.report with the package's metric names
                    opt,
                    {
                        "step": step + 1,
                        "train_loss": loss_sum / loss_count,
                        "val_loss": val_loss,
                        "val_accuracy": accuracy,
                    },
                    checkpoint_dir=directory,
                )
            loss_sum, loss_count = 0.0, 0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run (CI): well under a minute on 2 CPUs")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    parser.add_argument("--num-samples", type=int, default=None)
    parser.add_argument(
        "--storage-path", default=None, help="where Tune writes results (default ~/ray_results)"
    )
    args = parser.parse_args(argv)

    import ray
    from ray import tune

    ray.init(address=args.address or "local", include_dashboard=False, log_to_driver=False)
    config = {
        "lr": tune.loguniform(3e-3, 3e-2),
        "weight_decay": 1e-4,
        "batch_size": 64,
        "steps": 60 if args.smoke else 3000,
        "eval_every": 20 if args.smoke else 100,
        "seed": tune.randint(0, 10_000),
    }
    tuner = tune.Tuner(
        train_fn,
        param_space=config,
        tune_config=tune.TuneConfig(
            metric="val_loss", mode="min", num_samples=args.num_samples or (2 if args.smoke else 8)
        ),
        run_config=tune.RunConfig(storage_path=args.storage_path, verbose=0 if args.smoke else 1),
    )
    grid = tuner.fit()  # a ResultGrid; failed trials are in grid.errors, not raised
    finished = [r.metrics for r in grid if r.error is None and (r.metrics or {}).get("best_val_loss") is not None]
    summary = {
        "example": "custom_trainable",
        "num_trials": len(grid),
        "num_errored": grid.num_errors,
        "best_val_loss": min((m["best_val_loss"] for m in finished), default=None),
        "best_val_accuracy": max((m["val_accuracy"] for m in finished), default=None),
        "num_decisions": sum(m["meta/num_decisions"] for m in finished),
    }
    ray.shutdown()
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
