"""Where the RL wrapper's overhead falls: decision steps vs the steps between decisions.

Times every iteration on its own (``benchmarks/overhead.py``'s model and iteration), raw and
wrapped iterations alternating, and splits the wrapped ones by whether a decision was due. The
per-step overhead at ``update_frequency=10`` is then ``0.9 * (between - raw) + 0.1 * (decision -
raw)``, a direct attribution that the block-ratio figure of ``policy_actor.py --parts overhead``
cannot give.

Run:
    PYTHONPATH=. python benchmarks/rl_step_split.py --hidden 512 --batch 128 --mode frozen
    PYTHONPATH=. python benchmarks/rl_step_split.py --mode aa     # raw against raw: the noise floor
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import Bench  # noqa: E402

from ray_metaopt import PlateauMetaOptimizer  # noqa: E402
from ray_metaopt.rl import RLMetaOptimizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--mode", choices=("frozen", "learning", "plateau", "aa"), default="frozen")
    parser.add_argument("--reps", type=int, default=60)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.mode in ("plateau", "aa"):  # aa: raw against raw, the noise floor
        meta = PlateauMetaOptimizer(patience=3, lr_factor=0.5, update_frequency=10)
    else:
        meta = RLMetaOptimizer(update_frequency=10, seed=0, frozen=args.mode == "frozen")
    bench = Bench(meta, torch.device("cpu"), hidden=args.hidden, batch=args.batch)
    for _ in range(200):
        bench.raw_iteration()
        bench.wrapped_iteration()
    raw, decision, between = [], [], []
    step = bench.wrapped.step_count
    for _ in range(args.reps * 50):  # raw and wrapped iterations alternate, so drift hits both alike
        start = time.perf_counter()
        bench.raw_iteration()
        raw.append(time.perf_counter() - start)
        due = meta.should_update(step)
        step += 1
        start = time.perf_counter()
        if args.mode == "aa":  # the same split into "decision" and "between" steps, nothing wrapped
            bench.raw_iteration()
        else:
            bench.wrapped_iteration()
        (decision if due else between).append(time.perf_counter() - start)
    r, d, b = (statistics.median(x) * 1e6 for x in (raw, decision, between))
    per_step = 0.9 * (b - r) + 0.1 * (d - r)
    print(
        f"{args.mode}, MLP 256-{args.hidden}-{args.hidden}-10, batch {args.batch}: raw {r:.1f} us, "
        f"between decisions {b:.1f} us (+{b - r:.1f}), decision {d:.1f} us (+{d - r:.1f}); "
        f"overhead per step {per_step:.1f} us = {1 + per_step / r:.4f}x (medians)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
