"""Overhead of OptimizerWrapper + a meta-optimizer on a whole training iteration.

Times the full iteration (zero_grad, forward, backward, metrics, ``update_hyperparameters``,
step) with the wrapper against the same iteration on the raw optimizer (metrics computed, no
``update_hyperparameters``). Raw and wrapped blocks alternate in one run (which one goes first
alternates too) and use the *same* model and optimizer, so memory layout and optimizer state are
identical; the figure is the median over repetitions of (wrapped block time / raw block time).
An A/A row (raw against raw) shows the noise floor of the machine.

On CUDA it also checks, under ``torch.cuda.set_sync_debug_mode("error")``, that non-decision
steps cause no host sync (and, as a control, that a decision step does read the metrics).

Run:
    python benchmarks/overhead.py                 # CPU (and CUDA when present)
    python benchmarks/overhead.py --device cpu --reps 40 --block 50
    python benchmarks/overhead.py --profile       # also: where the wrapper's per-step time goes
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit
from typing import Callable

import torch

from ray_metaopt import OptimizerWrapper
from ray_metaopt.metrics import check_metrics
from ray_metaopt.plateau import AdvancedPlateauMetaOptimizer, PlateauMetaOptimizer
from ray_metaopt.rl import RLMetaOptimizer


def make_model(d_in: int, hidden: int, d_out: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, d_out),
    ).to(device)


class Bench:
    """One model, one AdamW, one wrapper around that same AdamW; iterations with or without it."""

    def __init__(
        self,
        meta,
        device,
        d_in=256,
        hidden=512,
        d_out=10,
        batch=128,
        seed_metrics=False,
        wrapper_cls=OptimizerWrapper,
    ):
        self.device = device
        self.model = make_model(d_in, hidden, d_out, device)
        self.raw = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.wrapped = wrapper_cls(self.raw, meta) if meta is not None else None
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, d_in, generator=gen).to(device)
        self.y = torch.randint(0, d_out, (batch,), generator=gen).to(device)
        self.seed_metrics = seed_metrics

    def _metrics(self, loss: torch.Tensor) -> dict:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        if self.seed_metrics:  # the seed's dict: loss.item() syncs every step, wrapped or not
            return {"loss": loss.item(), "lr": self.raw.param_groups[0]["lr"], "grad_norm": grad_norm}
        return {"loss": loss.detach(), "grad_norm": grad_norm}

    def raw_iteration(self) -> None:
        self.raw.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self._metrics(loss)
        self.raw.step()

    def update_only_iteration(self) -> None:
        """Ablation: the raw iteration plus update_hyperparameters (raw step)."""
        self.raw.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.wrapped.update_hyperparameters(self._metrics(loss))
        self.raw.step()

    def step_only_iteration(self) -> None:
        """Ablation: the raw iteration with the wrapper's step (no update_hyperparameters)."""
        self.raw.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self._metrics(loss)
        self.wrapped.step()

    def wrapped_iteration(self) -> None:
        opt = self.wrapped
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        opt.update_hyperparameters(self._metrics(loss))
        opt.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(fn: Callable[[], None], n: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved(a: Callable[[], None], b: Callable[[], None], reps: int, block: int, device) -> dict:
    """Median of (b block time / a block time), alternating which runs first."""
    for fn in (a, b):  # warm-up (allocator, optimizer state, caches)
        time_block(fn, block, device)
    ratios, ta, tb = [], [], []
    for rep in range(reps):
        if rep % 2 == 0:
            x = time_block(a, block, device)
            y = time_block(b, block, device)
        else:
            y = time_block(b, block, device)
            x = time_block(a, block, device)
        ratios.append(y / x)
        ta.append(x / block)
        tb.append(y / block)
    q = statistics.quantiles(ratios, n=4)
    return {
        "ratio": statistics.median(ratios),
        "q1": q[0],
        "q3": q[2],
        "raw_us": statistics.median(ta) * 1e6,
        "wrapped_us": statistics.median(tb) * 1e6,
    }


def _plateau10():
    return PlateauMetaOptimizer(patience=3, lr_factor=0.5, update_frequency=10)


CONFIGS = [
    # name, meta factory (None: A/A), seed-style metrics[, iteration, wrapper class]
    ("A/A control: raw vs raw", None, False),
    (
        "Plateau, tensor metrics, update_frequency=10",
        lambda: PlateauMetaOptimizer(patience=3, lr_factor=0.5, update_frequency=10),
        False,
    ),
    (
        "Plateau, tensor metrics, update_frequency=1",
        lambda: PlateauMetaOptimizer(patience=3, lr_factor=0.5, update_frequency=1),
        False,
    ),
    (
        "Plateau, seed metrics (loss.item()), update_frequency=10",
        lambda: PlateauMetaOptimizer(patience=3, lr_factor=0.5, update_frequency=10),
        True,
    ),
    (
        "AdvancedPlateau (seed config), tensor metrics, update_frequency=10",
        lambda: AdvancedPlateauMetaOptimizer(
            patience=3,
            lr_factor=0.5,
            grad_norm_threshold=10.0,
            weight_decay_factor=1.5,
            warmup_steps=50,
            trend_window=5,
            update_frequency=10,
        ),
        False,
    ),
    (
        # issue 13's target: a frozen shipped policy at update_frequency=10 <= 1.01x the raw step
        "RL, frozen shipped policy anchored-cosine-v1, update_frequency=10",
        lambda: RLMetaOptimizer.from_pretrained("anchored-cosine-v1", update_frequency=10, total_steps=10**6, seed=0),
        False,
    ),
    ("ablation: only update_hyperparameters (uf=10), raw step", _plateau10, False, "update_only_iteration"),
    ("ablation: only wrapper.step() instead of raw step", _plateau10, False, "step_only_iteration"),
]


def run_timings(device: torch.device, args) -> list[tuple[str, dict]]:
    rows = []
    for name, factory, seed_metrics, *rest in CONFIGS:
        if args.no_ablation and len(rest) > 0:
            continue
        iteration = rest[0] if rest else "wrapped_iteration"
        wrapper_cls = rest[1] if len(rest) > 1 else OptimizerWrapper
        bench = Bench(
            factory() if factory else None,
            device,
            hidden=args.hidden,
            batch=args.batch,
            seed_metrics=seed_metrics,
            wrapper_cls=wrapper_cls,
        )
        b = getattr(bench, iteration) if factory else bench.raw_iteration
        result = interleaved(bench.raw_iteration, b, args.reps, args.block, device)
        rows.append((name, result))
        print(
            f"  {name:<68s} median ratio {result['ratio']:.4f}x  "
            f"(IQR {result['q1']:.4f}-{result['q3']:.4f})  "
            f"raw {result['raw_us']:8.1f} us/it  wrapped {result['wrapped_us']:8.1f} us/it  "
            f"diff {result['wrapped_us'] - result['raw_us']:+6.1f} us/it",
            flush=True,
        )
    return rows


def sync_check(device: torch.device) -> bool:
    """Non-decision steps must not synchronise with the host; decision steps read the metrics."""
    meta = PlateauMetaOptimizer(patience=3, lr_factor=0.5, update_frequency=10)
    bench = Bench(meta, device)
    for _ in range(25):  # warm-up, including decisions at steps 9 and 19
        bench.wrapped_iteration()
    _sync(device)
    ok = True

    def guarded(label: str, fn: Callable[[], None], n: int, expect_sync: bool) -> None:
        nonlocal ok
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(n):
                fn()
            synced, message = False, ""
        except RuntimeError as exc:
            synced, message = True, str(exc).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
            _sync(device)
        passed = synced == expect_sync
        ok &= passed
        what = "synchronised" if synced else "no host sync"
        print(f"  {'PASS' if passed else 'FAIL'}: {label}: {what} {message}".rstrip(), flush=True)

    guarded(
        "raw iterations (baseline: forward, backward, clip_grad_norm_, AdamW.step)",
        bench.raw_iteration,
        10,
        False,
    )
    # the wrapper's next step is 25: steps 25..28 are not decision steps (next decision: 29)
    assert not any(
        meta.should_update(s) for s in range(bench.wrapped.step_count, bench.wrapped.step_count + 4)
    )
    guarded("wrapped non-decision iterations (steps 25-28)", bench.wrapped_iteration, 4, False)
    assert meta.should_update(bench.wrapped.step_count)
    guarded(
        "control: wrapped decision iteration (step 29) reads the metrics", bench.wrapped_iteration, 1, True
    )
    return ok


def profile_wrapper(args) -> None:
    """Per-call cost of the wrapper's per-step path (CPU), to see what the overhead is made of."""
    device = torch.device("cpu")
    meta = PlateauMetaOptimizer(update_frequency=10**9)  # never decides: the non-decision path
    # A tiny model, so that step() is mostly per-call overhead rather than arithmetic.
    bench = Bench(meta, device, d_in=8, hidden=8, d_out=2, batch=4)
    bench.raw_iteration()
    opt, raw = bench.wrapped, bench.raw
    loss = torch.tensor(1.0)
    metrics = {"loss": loss, "grad_norm": torch.tensor(2.0)}
    unhooked_raw = type(raw).step.__wrapped__

    def record():
        with torch.autograd.profiler.record_function("Optimizer.step#OptimizerWrapper.step"):
            pass

    n = 2000
    cases = [
        ("update_hyperparameters (non-decision)", lambda: opt.update_hyperparameters(metrics)),
        ("  of which check_metrics", lambda: check_metrics(metrics)),
        ("  of which MetricAccumulator.add ('last')", lambda: opt._metrics.add(metrics)),
        ("  of which meta.should_update", lambda: meta.should_update(5)),
        ("raw.step()", raw.step),
        ("wrapper.step()", opt.step),
        ("raw.step without torch's profile hook", lambda: unhooked_raw(raw)),
        ("record_function enter/exit", record),
        ("raw.zero_grad()", raw.zero_grad),
        ("wrapper.zero_grad()", opt.zero_grad),
    ]
    times = {label: [] for label, _ in cases}
    for _ in range(9):  # rounds, each timing every case in turn, so drift hits all alike
        for label, fn in cases:
            times[label].append(timeit.timeit(fn, number=n) / n * 1e6)
    print(f"  per-call cost, median of 9 rounds x {n} calls (cases interleaved):")
    for label, _ in cases:
        print(f"    {label:<48s} {statistics.median(times[label]):8.2f} us")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--reps", type=int, default=40, help="raw/wrapped block pairs")
    parser.add_argument("--block", type=int, default=50, help="iterations per block")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: stable numbers)")
    parser.add_argument("--profile", action="store_true", help="break the wrapper's per-step cost down (CPU)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the ablation rows")
    args = parser.parse_args(argv)
    if args.reps < 2 or args.block < 1:
        parser.error(f"--reps must be >= 2 and --block >= 1, got --reps {args.reps} --block {args.block}")
    torch.set_num_threads(args.threads)

    devices = []
    if args.device in ("auto", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")

    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"MLP 256-{args.hidden}-{args.hidden}-10, "
        f"batch {args.batch}, AdamW, {args.reps} reps x {args.block} iterations per block"
    )
    ok = True
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"\n[{device.type}] {name}", flush=True)
        rows = run_timings(device, args)
        target = dict(rows)["Plateau, tensor metrics, update_frequency=10"]["ratio"]
        print(
            f"  target <= 1.01x with tensor metrics and update_frequency=10: {target:.4f}x "
            f"{'MET' if target <= 1.01 else 'NOT MET'}"
        )
        if device.type == "cuda":
            print("\n[cuda] host-sync check under torch.cuda.set_sync_debug_mode('error')", flush=True)
            ok &= sync_check(device)
    if args.profile:
        print("\n[profile] the wrapper's per-step path on CPU")
        profile_wrapper(args)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
