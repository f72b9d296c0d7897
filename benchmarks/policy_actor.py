"""Benchmarks of the RL meta-optimizer and its shared policy actor (issue 3).

Three figures, measured in one run:

1. **Actor ingestion**: transitions per second the :class:`~ray_metaopt.rl.PolicyActor` takes in
   (``submit`` calls of 8-transition segments from the driver, REINFORCE updates of 32 included),
   timed until the actor has processed the last segment.
2. **Trial throughput, shared vs local policy** (target >= 0.97x): the same Ray trial actors
   train the same model for the same steps with ``RLMetaOptimizer(shared_policy=...)`` and with a
   local policy; rounds alternate shared/local (and which one goes first), the figure is the
   median over rounds of (shared steps/s / local steps/s), every trial of a round counted.
3. **Decision cost**: CPU microseconds of one decision step (frozen, learning, per group); the
   minimum over blocks is the figure least disturbed by other load on the machine.
4. **Scale** (``--parts scale``): ``--clients`` (64) light trial clients (the real
   ``PolicyClient``, no model, synthetic transitions) against one actor: flat-out ingestion
   (every client sends 200 segments of 8 at once; target >= 10k transitions/s), then a trial's
   rhythm (a 5 ms step as a sleep, a decision every 10 steps, a segment every 8 decisions,
   weights polled every step) timing only the client calls (target <= 1% of the step), as wall
   time and as CPU time of the calling thread.
5. **RL wrapper overhead vs the raw optimizer** at ``update_frequency=10`` (target <= 1.03x):
   the interleaved raw/wrapped blocks of ``benchmarks/overhead.py`` (same model, same AdamW),
   with a learning RLMetaOptimizer, a frozen one, and an A/A control row.

Run (results go to benchmarks/RESULTS-policy-actor.md by hand):
    PYTHONPATH=. python benchmarks/policy_actor.py                      # all three, CPU
    PYTHONPATH=. python benchmarks/policy_actor.py --parts overhead --device cuda
    PYTHONPATH=. python benchmarks/policy_actor.py --quick              # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import Bench, interleaved

from ray_metaopt.rl import RLMetaOptimizer
from ray_metaopt.rl.features import STATE_DIM

POLICY = {"batch_size": 32, "policy_lr": 1e-3}


def _segments(count: int, segment_size: int, seed: int) -> list[list[dict]]:
    """Transitions shaped as trials send them (STATE_DIM rows, 3x3 actions, version 0)."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(count * segment_size, STATE_DIM, generator=gen).clamp(-3, 3).tolist()
    return [
        [
            {
                "rows": [feats[k * segment_size + i]],
                "lr": [i % 3],
                "wd": [(i * 7) % 3],
                "logp": math.log(1 / 9),
                "ret": 0.1 * ((k + i + seed) % 5),
                "progress": ((k + i) % 10) / 10,
                "decision": k,
                "version": 0,
            }
            for i in range(segment_size)
        ]
        for k in range(count)
    ]


# ---------------------------------------------------------------------- 1. actor ingestion
def bench_ingestion(ray, segments: int, segment_size: int = 8) -> dict:
    from ray_metaopt.rl import start_policy_actor

    # Every segment says version 0; with no staleness bound (the default) every one is learned from.
    actor = start_policy_actor("bench_ingest", namespace="ray_metaopt_bench", policy_config=POLICY)
    payloads = _segments(segments, segment_size, seed=0)
    ray.get(actor.stats.remote())  # up and idle
    start = time.perf_counter()
    refs = [actor.submit.remote(p, f"producer{k % 4}") for k, p in enumerate(payloads)]
    ray.get(refs[-1])  # the actor runs calls in order: the last done means all done
    elapsed = time.perf_counter() - start
    stats = ray.get(actor.stats.remote())
    ray.kill(actor)
    n = segments * segment_size
    return {
        "transitions": n,
        "seconds": elapsed,
        "transitions_per_s": n / elapsed,
        "updates": stats["policy/updates"],
        "updates_per_s": stats["policy/updates"] / elapsed,
        "dropped_stale": stats["rollouts/dropped_stale"],
    }


# ---------------------------------------------------------------------- 2. shared vs local trials
class _BenchTrial:
    def run(self, mode: str, steps: int, seed: int, hidden: int, batch: int) -> dict:
        torch.set_num_threads(1)
        torch.manual_seed(seed)
        from ray_metaopt import OptimizerWrapper

        model = torch.nn.Sequential(
            torch.nn.Linear(64, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, 1),
        )
        x, y = torch.randn(batch, 64), torch.randn(batch, 1)
        shared = (
            {"shared_policy": "bench_shared", "policy_namespace": "ray_metaopt_bench"}
            if mode == "shared"
            else {}
        )
        meta = RLMetaOptimizer(update_frequency=10, total_steps=steps, seed=seed, **POLICY, **shared)
        opt = OptimizerWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3), meta)
        start = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.update_hyperparameters({"loss": loss.detach(), "grad_norm": grad_norm})
            opt.step()
        elapsed = time.perf_counter() - start
        meta.finish(timeout_s=10.0)  # not timed: after training
        stats = meta.stats()
        return {
            "steps_per_s": steps / elapsed,
            "weight_updates": stats.get("rl/client_weight_updates", 0),
            "local_updates": stats["rl/local_updates"],
            "version": stats["policy/version"],
        }


def bench_trials(ray, trials: int, rounds: int, steps: int, hidden: int, batch: int) -> dict:
    from ray_metaopt.rl import start_policy_actor

    actor = start_policy_actor("bench_shared", namespace="ray_metaopt_bench", policy_config=POLICY)
    workers = [ray.remote(num_cpus=1)(_BenchTrial).remote() for _ in range(trials)]
    # Warm-up round of each mode (process start, imports, first connection).
    for mode in ("local", "shared"):
        ray.get([w.run.remote(mode, 200, i, hidden, batch) for i, w in enumerate(workers)])
    ratios, rows = [], []
    for r in range(rounds):
        order = ("shared", "local") if r % 2 == 0 else ("local", "shared")
        rates = {}
        for mode in order:
            out = ray.get(
                [w.run.remote(mode, steps, 100 * r + i, hidden, batch) for i, w in enumerate(workers)]
            )
            rates[mode] = [o["steps_per_s"] for o in out]
            rows.append({"round": r, "mode": mode, **{k: [o[k] for o in out] for k in out[0]}})
        ratios.append(sum(rates["shared"]) / sum(rates["local"]))
    stats = ray.get(actor.stats.remote())
    for w in [*workers, actor]:
        ray.kill(w)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    local = [s for row in rows if row["mode"] == "local" for s in row["steps_per_s"]]
    shared = [s for row in rows if row["mode"] == "shared" for s in row["steps_per_s"]]
    return {
        "ratio": statistics.median(ratios),
        "q1": q[0],
        "q3": q[2],
        "local_steps_per_s": statistics.median(local),
        "shared_steps_per_s": statistics.median(shared),
        "actor_updates": stats["policy/updates"],
        "actor_transitions": stats["rollouts/transitions"],
        "actor_dropped_stale": stats["rollouts/dropped_stale"],
        "actor_version_lag_mean": stats["rollouts/version_lag_mean"],
        "shared_weight_updates_per_trial": statistics.median(
            [u for row in rows if row["mode"] == "shared" for u in row["weight_updates"]]
        ),
    }


# ---------------------------------------------------------------------- 2b. many clients
class _ScaleClient:
    """A light trial: no model, the real :class:`~ray_metaopt.rl.actor.PolicyClient`, replaying
    prepared transitions, so that dozens fit on 2 cores."""

    def __init__(self, index: int, max_batch: int) -> None:
        torch.set_num_threads(1)
        from ray_metaopt.rl.actor import PolicyClient

        self.index = index
        self.client = PolicyClient("bench_scale", "ray_metaopt_bench", source=f"client{index}", max_batch=max_batch)

    def ready(self) -> bool:
        return self.client._connect()

    def flood(self, segments: int, segment_size: int, start_at: float) -> dict:
        """Send ``segments`` segments back to back from ``start_at`` (wall clock), then drain."""
        payloads = _segments(segments, segment_size, self.index)
        time.sleep(max(0.0, start_at - time.time()))
        started = time.perf_counter()
        for p in payloads:
            self.client.send(p)
        send_s = time.perf_counter() - started
        self.client.drain(timeout_s=120.0)
        return {"send_s": send_s, "done_at": time.time(), "outbox": self.client.stats()["outbox"]}

    def paced(self, steps: int, step_s: float, decision_every: int, segment_size: int, start_at: float) -> dict:
        """A trial's rhythm: a ``step_s`` step (a sleep: the CPUs stay free for the others), a
        decision every ``decision_every`` steps, a segment sent every ``segment_size`` decisions,
        weights polled every step as :class:`RLMetaOptimizer` does. Times only the client calls."""
        payloads = _segments(steps // (decision_every * segment_size) + 1, segment_size, 1000 + self.index)
        time.sleep(max(0.0, start_at - time.time()))
        version, cost, cpu, sent = 0, 0.0, 0.0, 0
        for step in range(1, steps + 1):
            time.sleep(step_s)
            t0, c0 = time.perf_counter(), time.thread_time()
            update = self.client.poll(version)
            if update is not None:
                version = int(update["version"])
            if step % (decision_every * segment_size) == 0:
                self.client.send(payloads[sent])
                sent += 1
            cost += time.perf_counter() - t0
            cpu += time.thread_time() - c0
        self.client.drain(timeout_s=60.0)
        budget = steps * step_s
        return {"cost_fraction": cost / budget, "cpu_fraction": cpu / budget, "segments": sent, "version": version}


def bench_scale(
    ray, clients: int, segments: int, paced_steps: int, segment_size: int = 8, max_batch: int = 256, floods: int = 1
) -> dict:
    """``clients`` light trials against one actor: flat-out ingestion, then a trial's rhythm.

    ``max_batch`` is the clients' :class:`PolicyClient` setting; 1 sends every segment as its own
    call (the client before batching)."""
    from ray_metaopt.rl import start_policy_actor

    actor = start_policy_actor("bench_scale", namespace="ray_metaopt_bench", policy_config=POLICY)
    started = time.perf_counter()
    workers = [ray.remote(num_cpus=0)(_ScaleClient).remote(i, max_batch) for i in range(clients)]
    assert all(ray.get([w.ready.remote() for w in workers]))
    startup_s = time.perf_counter() - started

    # The flood repeated ``floods`` times with the same clients and actor: on a box shared by 65
    # processes one flood's rate varies by +-30 %; the median is reported, every run is kept.
    rates, received_all, seconds_all = [], [], []
    for _ in range(floods):
        before = ray.get(actor.stats.remote())["rollouts/transitions"]
        start_at = time.time() + 2.0
        flood = ray.get([w.flood.remote(segments, segment_size, start_at) for w in workers])
        stats = ray.get(actor.stats.remote())
        seconds_all.append(max(f["done_at"] for f in flood) - start_at)
        received_all.append(stats["rollouts/transitions"] - before)
        rates.append(received_all[-1] / seconds_all[-1])
    middle = sorted(range(floods), key=rates.__getitem__)[floods // 2]
    ingest_s, received = seconds_all[middle], received_all[middle]

    start_at = time.time() + 2.0
    paced = ray.get([w.paced.remote(paced_steps, 0.005, 10, segment_size, start_at) for w in workers])
    final = ray.get(actor.stats.remote())
    for w in [*workers, actor]:
        ray.kill(w)
    costs = [p["cost_fraction"] for p in paced]
    cpus = [p["cpu_fraction"] for p in paced]
    return {
        "clients": clients,
        "max_batch": max_batch,
        "client_startup_s": startup_s,
        "flood_transitions_sent": clients * segments * segment_size,
        "flood_transitions_received": received,
        "flood_seconds": ingest_s,
        "transitions_per_s": received / ingest_s,
        "flood_transitions_per_s_all": rates,
        "flood_send_s_median": statistics.median(f["send_s"] for f in flood),
        "flood_left_in_outbox": sum(f["outbox"] for f in flood),
        "paced_cost_fraction_median": statistics.median(costs),
        "paced_cost_fraction_max": max(costs),
        "paced_cpu_fraction_median": statistics.median(cpus),
        "paced_cpu_fraction_max": max(cpus),
        "paced_segments": sum(p["segments"] for p in paced),
        "paced_min_client_version": min(p["version"] for p in paced),
        "actor_version": final["policy/version"],
        "actor_updates": final["policy/updates"],
        "actor_dropped_stale": final["rollouts/dropped_stale"],
        "actor_version_lag_mean": final["rollouts/version_lag_mean"],
    }


# ---------------------------------------------------------------------- 3. wrapper overhead
def bench_decide(blocks: int = 20, per_block: int = 200) -> list[dict]:
    """CPU cost of one decision (the wrapper's decision step with an RLMetaOptimizer), in us.

    The minimum over blocks is the figure least disturbed by other load on the machine.
    """
    from ray_metaopt import OptimizerWrapper

    cases = [
        ("frozen, 1 group", {"frozen": True}, 1),
        ("learning locally (update every 32 decisions, amortized), 1 group", {}, 1),
        ("learning locally, per_group=True, 4 groups", {"per_group": True}, 4),
    ]
    rows = []
    for name, kwargs, groups in cases:
        params = [torch.nn.Parameter(torch.zeros(8)) for _ in range(groups)]
        meta = RLMetaOptimizer(update_frequency=1, seed=0, **POLICY, **kwargs)
        opt = OptimizerWrapper(torch.optim.AdamW([{"params": [p]} for p in params], lr=1e-3), meta)
        metrics = {"loss": torch.tensor(1.0), "grad_norm": torch.tensor(1.0)}
        for i in range(200):
            metrics["loss"] = torch.tensor(1.0 / (1 + i))
            opt.update_hyperparameters(metrics)
        times = []
        for b in range(blocks):
            losses = [torch.tensor(1.0 / (1 + b * per_block + i)) for i in range(per_block)]
            start = time.perf_counter()
            for loss in losses:
                metrics["loss"] = loss
                opt.update_hyperparameters(metrics)
            times.append((time.perf_counter() - start) / per_block * 1e6)
        rows.append(
            {
                "name": name,
                "min_us": min(times),
                "median_us": statistics.median(times),
                "updates": meta.learner.updates,
            }
        )
        print(
            f"  [decide] {name:<66s} min {min(times):7.1f} us  median {statistics.median(times):7.1f} us "
            f"per decision ({meta.learner.updates} policy updates)",
            flush=True,
        )
    return rows


def bench_overhead(device: torch.device, reps: int, block: int, sizes: list[tuple[int, int]]) -> list[dict]:
    configs = [
        ("A/A control: raw vs raw", None),
        (
            "RLMetaOptimizer, learning locally, update_frequency=10",
            lambda: RLMetaOptimizer(update_frequency=10, seed=0, **POLICY),
        ),
        (
            "RLMetaOptimizer, frozen, update_frequency=10",
            lambda: RLMetaOptimizer(update_frequency=10, seed=0, frozen=True),
        ),
    ]
    rows = []
    for hidden, batch in sizes:
        for name, factory in configs:
            bench = Bench(factory() if factory else None, device, hidden=hidden, batch=batch)
            b = bench.wrapped_iteration if factory else bench.raw_iteration
            result = interleaved(bench.raw_iteration, b, reps, block, device)
            if factory:
                meta = bench.wrapped.meta_optimizer
                result["policy_updates"] = meta.learner.updates
                result["decisions"] = meta.counters["decisions"]
            rows.append(
                {
                    "device": device.type,
                    "model": f"MLP 256-{hidden}-{hidden}-10, batch {batch}",
                    "name": name,
                    **result,
                }
            )
            print(
                f"  [{device.type}] hidden={hidden:<4d} batch={batch:<4d} {name:<58s} median {result['ratio']:.4f}x "
                f"(IQR {result['q1']:.4f}-{result['q3']:.4f}) raw {result['raw_us']:8.1f} us/it "
                f"wrapped {result['wrapped_us']:8.1f} us/it",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--parts", default="ingest,trials,overhead", help="comma-separated: ingest, trials, scale, decide, overhead"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device of the overhead part")
    p.add_argument("--quick", action="store_true", help="small sizes: checks that the script runs")
    p.add_argument("--trials", type=int, default=2, help="concurrent trials (one CPU each)")
    p.add_argument("--clients", type=int, default=64, help="light trial clients of the scale part")
    p.add_argument(
        "--max-batch", default="1,256",
        help="scale part: the clients' PolicyClient max_batch values, run one after the other (1: no batching)",
    )
    p.add_argument("--floods", type=int, default=3, help="scale part: flood phases per setting (the median is reported)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: trials)")
    p.add_argument("--rounds", type=int, default=None, help="shared/local round pairs (default 8; quick 2)")
    p.add_argument("--steps", type=int, default=None, help="steps per trial run (default 3000; quick 300)")
    p.add_argument("--reps", type=int, default=None, help="raw/wrapped block pairs (default 30; quick 6)")
    p.add_argument(
        "--sizes", default=None, help="overhead part: hiddenxbatch models, comma-separated (default 128x64,512x128)"
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    parts = set(args.parts.split(","))
    q = args.quick
    results: dict = {"torch": torch.__version__, "argv": sys.argv[1:]}

    if parts & {"ingest", "trials", "scale"}:
        import ray

        ray.init(
            num_cpus=args.num_cpus or max(args.trials, 2),
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
        )
        results["ray"] = ray.__version__
        if "ingest" in parts:
            r = bench_ingestion(ray, segments=200 if q else 4000)
            results["ingest"] = r
            print(
                f"[ingest] {r['transitions']} transitions in {r['seconds']:.2f} s: "
                f"{r['transitions_per_s']:.0f} transitions/s, {r['updates']} updates ({r['updates_per_s']:.1f}/s)",
                flush=True,
            )
        if "trials" in parts:
            r = bench_trials(
                ray,
                args.trials,
                rounds=args.rounds or (2 if q else 8),
                steps=args.steps or (300 if q else 3000),
                hidden=128,
                batch=64,
            )
            results["trials"] = r
            print(
                f"[trials] {args.trials} trials: shared/local steps/s median ratio {r['ratio']:.4f}x "
                f"(IQR {r['q1']:.4f}-{r['q3']:.4f}); local {r['local_steps_per_s']:.0f} steps/s, "
                f"shared {r['shared_steps_per_s']:.0f} steps/s; actor: {r['actor_updates']} updates, "
                f"{r['actor_transitions']} transitions, {r['actor_dropped_stale']} stale, "
                f"mean lag {r['actor_version_lag_mean']:.2f}; target >= 0.97x: "
                f"{'MET' if r['ratio'] >= 0.97 else 'NOT MET'}",
                flush=True,
            )
        for max_batch in [int(x) for x in args.max_batch.split(",")] if "scale" in parts else ():
            r = bench_scale(
                ray,
                args.clients,
                segments=10 if q else 200,
                paced_steps=200 if q else 2000,
                max_batch=max_batch,
                floods=args.floods,
            )
            results.setdefault("scale", []).append(r)
            print(
                f"[scale] {r['clients']} clients, max_batch={max_batch}: {r['flood_transitions_received']}/{r['flood_transitions_sent']} "
                f"transitions in {r['flood_seconds']:.2f} s: {r['transitions_per_s']:.0f} transitions/s "
                f"(median of {len(r['flood_transitions_per_s_all'])} floods: "
                f"{', '.join(f'{x:.0f}' for x in r['flood_transitions_per_s_all'])}) "
                f"(target >= 10000: {'MET' if r['transitions_per_s'] >= 10000 else 'NOT MET'}); trial-side "
                f"send+poll cost at a 5 ms step: wall median {100 * r['paced_cost_fraction_median']:.3f}% (max "
                f"{100 * r['paced_cost_fraction_max']:.3f}%; includes waiting for a core), CPU of the calling "
                f"thread median {100 * r['paced_cpu_fraction_median']:.3f}% (max {100 * r['paced_cpu_fraction_max']:.3f}%) "
                f"(target <= 1%: wall {'MET' if r['paced_cost_fraction_median'] <= 0.01 else 'NOT MET'}, CPU "
                f"{'MET' if r['paced_cpu_fraction_median'] <= 0.01 else 'NOT MET'}); actor: "
                f"{r['actor_updates']} updates, lag {r['actor_version_lag_mean']:.1f}, slowest client at "
                f"version {r['paced_min_client_version']}",
                flush=True,
            )
        if len(results.get("scale", [])) > 1:
            first = results["scale"][0]
            for r in results["scale"][1:]:
                print(
                    f"[scale] max_batch={r['max_batch']} vs {first['max_batch']}, side by side: ingestion "
                    f"x{r['transitions_per_s'] / first['transitions_per_s']:.2f}, paced wall cost "
                    f"x{r['paced_cost_fraction_median'] / first['paced_cost_fraction_median']:.2f}",
                    flush=True,
                )
        ray.shutdown()

    if "decide" in parts:
        results["decide"] = bench_decide(blocks=5 if q else 20)
    if "overhead" in parts:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            p.error("--device cuda: CUDA is not available")
        if args.sizes:
            try:
                sizes = [tuple(int(x) for x in item.split("x")) for item in args.sizes.split(",")]
            except ValueError:
                p.error(f"--sizes must look like 128x64,512x128, got --sizes {args.sizes}")
            if any(len(size) != 2 or min(size) < 1 for size in sizes):
                p.error(f"--sizes must look like 128x64,512x128, got --sizes {args.sizes}")
        else:
            sizes = [(128, 64)] if q else [(128, 64), (512, 128)]
        rows = bench_overhead(device, reps=args.reps or (6 if q else 30), block=20 if q else 50, sizes=sizes)
        results["overhead"] = rows
        for row in rows:
            if row["name"].startswith("RLMetaOptimizer, learning"):
                print(
                    f"[overhead] {row['device']} {row['model']}: {row['ratio']:.4f}x; target <= 1.03x: "
                    f"{'MET' if row['ratio'] <= 1.03 else 'NOT MET'}"
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
