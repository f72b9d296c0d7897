"""How much can any *fixed* lr-multiplier trajectory on the RL base schedule gain on a task?

The RL policy's actions multiply the base schedule (the tuned cosine) by x0.5 ... x2. This measures
the headroom of that action space without a policy: every two-piece trajectory (multiplier m1 for
the first half of the run, m2 for the second, each in {0.5, 0.707, 1, 1.414, 2}) replayed on the
base at the tuned lr, the best pair chosen on ``--pick-seeds``, then measured on ``--eval-seeds``
(seeds no RL run has used) against the base alone. A policy that beats this by more than noise
responds to the state; one that only matches it learned a schedule.

Example:
    .venv/bin/python benchmarks/rl_headroom.py --task teacher_student --lr 0.0178 \
        --pick-seeds 600 601 602 603 604 605 606 607 608 609 --eval-seeds 610 611 612 613 614 615 616 617 618 619
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from ray_metaopt.bench.arms import SUITE_SIZES, ArmContext, arms_for, trial_config
from ray_metaopt.training.run import TrainingRun

MULTIPLIERS = (0.5, 0.707, 1.0, 1.414, 2.0)


def final_val_loss(task: str, lr: float, seed: int, m1: float, m2: float) -> float:
    size = SUITE_SIZES["quick"]
    arm = next(a for a in arms_for(task, size) if a.name == "rl_replay")
    schedule = [[0, m1], [size.max_steps[task] // 2, m2]]
    config = trial_config(arm, ArmContext(task, size, lr, seed, replay_schedule=schedule))
    config.pop("_bench")
    losses: list[float] = []
    TrainingRun(config).train(lambda result, checkpoint: losses.append(result["val_loss"]))
    return losses[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--lr", type=float, required=True, help="the base schedule's tuned lr")
    parser.add_argument("--pick-seeds", type=int, nargs="+", required=True)
    parser.add_argument("--eval-seeds", type=int, nargs="+", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.monotonic()
    base = {s: final_val_loss(args.task, args.lr, s, 1.0, 1.0) for s in args.pick_seeds + args.eval_seeds}
    picked = {}
    for m1, m2 in itertools.product(MULTIPLIERS, MULTIPLIERS):
        if (m1, m2) != (1.0, 1.0):
            picked[(m1, m2)] = statistics.median(
                final_val_loss(args.task, args.lr, s, m1, m2) / base[s] for s in args.pick_seeds
            )
    print(f"{args.task} at lr {args.lr:g}, pick seeds {args.pick_seeds}")
    for pair, ratio in sorted(picked.items(), key=lambda kv: kv[1])[:5]:
        print(f"  m1, m2 = {pair}: median ratio to the base on the pick seeds x{ratio:.4f}")
    best = min(picked, key=picked.get)
    ratios = [final_val_loss(args.task, args.lr, s, *best) / base[s] for s in args.eval_seeds]
    print(
        f"best {best} on eval seeds {args.eval_seeds}: median x{statistics.median(ratios):.4f}, "
        f"lower on {sum(r < 1 for r in ratios)}/{len(ratios)} ({time.monotonic() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
