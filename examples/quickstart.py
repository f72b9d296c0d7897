"""Quickstart: the seed's usage example on a small real task, generated in-process (no download).

A student MLP learns a random teacher network's function from noisy samples (the noise sets a
loss floor, so the validation loss plateaus). AdamW is wrapped in an ``OptimizerWrapper`` with a
``PlateauMetaOptimizer(patience=3, lr_factor=0.5)`` that decides once per epoch on the
validation loss and halves every param group's learning rate whenever it stops improving.

Run:
    python examples/quickstart.py            # about ten seconds on a CPU
    python examples/quickstart.py --smoke    # a few seconds
    python examples/quickstart.py --strategy advanced   # the seed's AdvancedPlateau configuration
    python examples/quickstart.py --per-step  # the seed's usage: a decision every step on the minibatch loss

Each run ends with the final validation loss and lr trajectory next to the same run (same seed,
init and batches) with the unwrapped AdamW.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.optim as optim

from ray_metaopt import OptimizerWrapper
from ray_metaopt.plateau import AdvancedPlateauMetaOptimizer, PlateauMetaOptimizer


def make_task(n_train: int, n_val: int, dim: int, noise: float, seed: int, device: torch.device):
    """Teacher-student regression: y = teacher(x) + noise, with a fixed random teacher MLP."""
    gen = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(dim, 64, generator=gen) / dim**0.5, torch.randn(64, 1, generator=gen) / 8.0]

    def sample(n):
        x = torch.randn(n, dim, generator=gen)
        y = torch.tanh(x @ teacher[0]) @ teacher[1] + noise * torch.randn(n, 1, generator=gen)
        return x.to(device), y.to(device)

    return sample(n_train), sample(n_val)


def build_meta(strategy: str, steps_per_epoch: int, *, per_step: bool = False):
    if per_step:
        # The seed's call as written, deciding every step on the minibatch loss: the default
        # noise_aware="auto" judges a plateau on window means, not on single noisy losses.
        if strategy == "plateau":
            return PlateauMetaOptimizer(patience=3, lr_factor=0.5)
        return AdvancedPlateauMetaOptimizer(
            patience=3, lr_factor=0.5, grad_norm_threshold=10.0, weight_decay_factor=1.5, warmup_steps=50, trend_window=5
        )
    if strategy == "plateau":
        # The seed's example, deciding once per epoch on the validation loss (patience counts
        # epochs, like torch's ReduceLROnPlateau stepped once per epoch).
        return PlateauMetaOptimizer(
            patience=3, lr_factor=0.5, monitor="val_loss", update_frequency=steps_per_epoch, min_lr=1e-4
        )
    return AdvancedPlateauMetaOptimizer(
        patience=3,
        lr_factor=0.5,
        grad_norm_threshold=10.0,
        weight_decay_factor=1.5,
        warmup_steps=50,
        trend_window=5,
        monitor="val_loss",
        update_frequency=steps_per_epoch,
        min_lr=1e-4,
    )


def train(args, meta_opt, device, *, verbose: bool) -> dict:
    """One training run; ``meta_opt=None`` trains with the plain AdamW (the comparison)."""
    torch.manual_seed(args.seed)
    n_train, batch_size = (512, 64) if args.smoke else (4096, 64)
    num_epochs = args.epochs if args.epochs is not None else (40 if args.smoke else 60)
    (x_train, y_train), (x_val, y_val) = make_task(
        n_train, 512, dim=8, noise=0.1, seed=args.seed, device=device
    )
    steps_per_epoch = n_train // batch_size

    model = torch.nn.Sequential(
        torch.nn.Linear(8, 64),
        torch.nn.GELU(),
        torch.nn.Linear(64, 64),
        torch.nn.GELU(),
        torch.nn.Linear(64, 1),
    ).to(device)

    # Setup (the seed's three lines)
    optimizer = optim.AdamW(model.parameters(), lr=args.lr)
    wrapped_optimizer = (
        OptimizerWrapper(optimizer, meta_opt, metric_reduction="mean") if meta_opt is not None else optimizer
    )

    def validation_loss() -> float:
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(x_val), y_val).item()

    start = time.perf_counter()
    shown = 0
    lrs = []
    for epoch in range(num_epochs):
        perm = torch.randperm(n_train, device=device)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            loss = torch.nn.functional.mse_loss(model(x_train[idx]), y_train[idx])

            wrapped_optimizer.zero_grad()
            loss.backward()

            # Calculate metrics (the seed's dict; loss.detach() instead of loss.item() would
            # avoid a host sync per step on a GPU: the wrapper reads tensors only when it decides)
            metrics = {
                "loss": loss.item(),
                "lr": wrapped_optimizer.param_groups[0]["lr"],
                "grad_norm": torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0),
            }
            if meta_opt is not None and args.per_step:
                pass  # the seed's usage: a decision every step on the minibatch loss
            elif i == steps_per_epoch - 1:  # the decision step: add the validation loss
                metrics["val_loss"] = validation_loss()

            # Update hyperparameters and step
            if meta_opt is not None:
                wrapped_optimizer.update_hyperparameters(metrics)
            wrapped_optimizer.step()

        val_loss = validation_loss()
        lr = wrapped_optimizer.param_groups[0]["lr"]
        lrs.append(lr)
        if verbose:
            print(f"epoch {epoch:3d}  last train loss {loss.item():.5f}  val loss {val_loss:.5f}  lr {lr:.3g}")
            for d in wrapped_optimizer.decisions[shown:]:
                if not d.reason.startswith("warmup"):
                    print(f"    decision @ step {d.step}: {d.hparam} {d.old:.3g} -> {d.new:.3g} ({d.reason})")
            shown = len(wrapped_optimizer.decisions)
    return {
        "val_loss": val_loss,
        "lrs": lrs,
        "decisions": wrapped_optimizer.decisions if meta_opt is not None else [],
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny run that finishes in seconds")
    parser.add_argument("--strategy", choices=["plateau", "advanced"], default="plateau")
    parser.add_argument(
        "--per-step",
        action="store_true",
        help="the seed's own usage: a decision every step on the minibatch loss (noise-aware rule)",
    )
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # a model this small only loses time to thread synchronisation
    steps_per_epoch = (512 if args.smoke else 4096) // 64
    meta_opt = build_meta(args.strategy, steps_per_epoch, per_step=args.per_step)
    print(f"device={device}  strategy={meta_opt!r}")
    wrapped = train(args, meta_opt, device, verbose=True)
    # The same run (seed, init, batches) with the unwrapped AdamW: what the wrapper changed.
    plain = train(args, None, device, verbose=False)

    decisions = wrapped["decisions"]
    print(
        f"final val loss {wrapped['val_loss']:.5f} (noise floor {0.1**2:.5f}), {len(decisions)} decisions, "
        f"final lr {wrapped['lrs'][-1]:.3g}, {wrapped['seconds']:.1f}s"
    )
    every = max(1, len(wrapped["lrs"]) // 8)
    epochs = list(range(0, len(wrapped["lrs"]), every)) + [len(wrapped["lrs"]) - 1]
    print("lr by epoch:   " + "  ".join(f"{e}:{wrapped['lrs'][e]:.3g}" for e in dict.fromkeys(epochs)))
    print(
        f"vs unwrapped AdamW (same seed, constant lr {args.lr:g}): final val loss {plain['val_loss']:.5f}; "
        f"wrapped / unwrapped = {wrapped['val_loss'] / plain['val_loss']:.3f}"
    )
    print(f"DECISIONS={len(decisions)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
