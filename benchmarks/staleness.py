"""Does the policy actor's staleness bound help or hurt as the number of trials grows?

The shared :class:`~ray_metaopt.rl.PolicyActor` drops transitions more than ``max_staleness``
policy versions old and importance-weights the younger ones (clipped at ``importance_clip``). The
version lag of a transition grows with the number of trials feeding the actor (more trials, more
updates per second, while each trial acts with weights it refreshes only every so often and sends a
transition only once its return is known). This benchmark measures, side by side in one run, what
the bound does to learning at several trial counts, with the real ``PolicyActor`` and
``PolicyNetwork`` (no Ray: the protocol is simulated in one process, deterministically).

The task is a contextual bandit over the real state rows (``STATE_DIM`` features): the best lr
action is "down" when feature 0 is negative and "up" otherwise (reward 1, else 0, plus noise).
Every simulated trial acts with its own copy of the policy, refreshed every ``--sync-every``
rounds; its transitions reach the actor ``--delay`` rounds after acting (the return horizon).
After the same number of transitions *sent*, the figure is the actor's greedy accuracy on fresh
states (1.0 = learned; about 0.33-0.5 = not), with the fraction of transitions dropped as stale.

Run (results go to benchmarks/RESULTS-staleness.md by hand):
    PYTHONPATH=. python benchmarks/staleness.py                  # 4, 16, 64 trials x 5 seeds
    PYTHONPATH=. python benchmarks/staleness.py --quick          # a smoke run
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time

import torch

from ray_metaopt.rl.actor import PolicyActor
from ray_metaopt.rl.features import STATE_DIM
from ray_metaopt.rl.policy import PolicyConfig, PolicyNetwork

POLICY = {"lr_actions": [0.5, 1.0, 2.0], "wd_actions": None, "policy_lr": 3e-3, "batch_size": 16,
          "entropy_weight": 0.01}


def best_action(rows: torch.Tensor) -> torch.Tensor:
    return torch.where(rows[:, 0] < 0, 0, 2)


def greedy_accuracy(actor: PolicyActor, gen: torch.Generator, n: int = 2000) -> float:
    net = PolicyNetwork(actor.config)
    net.load_state_dict(actor.learner.weights())
    rows = torch.randn(n, STATE_DIM, generator=gen)
    with torch.no_grad():
        logits, _ = net(rows)
    return float((logits.argmax(-1) == best_action(rows)).float().mean())


def simulate(trials: int, max_staleness: int | None, *, transitions: int, sync_every: int, delay: int,
             seed: int) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    actor = PolicyActor("sim", POLICY, max_staleness=max_staleness)
    config = PolicyConfig.from_dict(POLICY)
    policies = []
    for _ in range(trials):
        net = PolicyNetwork(config)
        net.load_state_dict(actor.learner.weights())
        policies.append([actor.learner.version, net])
    in_flight: collections.deque = collections.deque()
    sent = 0
    rounds = 0
    while sent < transitions:
        if rounds % sync_every == 0:  # every trial picks up the current weights
            for p in policies:
                p[0] = actor.learner.version
                p[1].load_state_dict(actor.learner.weights())
        rows = torch.randn(trials, STATE_DIM, generator=gen)
        best = best_action(rows)
        batch = []
        for i, (version, net) in enumerate(policies):
            logp, _ = net.act_log_probs([rows[i].tolist()])
            probs = torch.tensor(logp[0]).exp()
            action = int(torch.multinomial(probs, 1, generator=gen))
            reward = float(action == int(best[i])) + 0.3 * float(torch.randn((), generator=gen))
            batch.append({"rows": [rows[i].tolist()], "lr": [action], "wd": [-1], "logp": logp[0][action],
                          "ret": reward, "progress": 0.5, "decision": rounds, "version": version})
        in_flight.append(batch)
        if len(in_flight) > delay:
            for i, t in enumerate(in_flight.popleft()):
                actor.submit([t], source=f"trial{i}")
                sent += 1
        rounds += 1
    stats = actor.stats()
    return {
        "accuracy": greedy_accuracy(actor, gen),
        "dropped": stats["rollouts/dropped_stale"] / sent,
        "lag": stats["rollouts/version_lag_mean"],
        "updates": stats["policy/updates"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--transitions", type=int, default=4096, help="transitions sent per run")
    p.add_argument("--sync-every", type=int, default=8, help="rounds between weight refreshes")
    p.add_argument("--delay", type=int, default=6, help="rounds from acting to sending")
    p.add_argument("--bounds", nargs="+", default=["16", "none"], help="max_staleness values ('none': no bound)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.trials, args.seeds, args.transitions = [4, 16], 1, 512
    torch.set_num_threads(1)
    started = time.perf_counter()
    print(f"transitions/run={args.transitions} sync_every={args.sync_every} delay={args.delay} seeds={args.seeds}")
    print("| trials | max_staleness | greedy accuracy: median [min, max] | dropped stale | mean version lag |")
    print("|---|---|---|---|---|")
    rows = []
    for trials in args.trials:
        for label in args.bounds:
            bound = None if label == "none" else int(label)
            runs = [simulate(trials, bound, transitions=args.transitions, sync_every=args.sync_every,
                             delay=args.delay, seed=s) for s in range(args.seeds)]
            acc = [r["accuracy"] for r in runs]
            row = {"trials": trials, "max_staleness": bound,
                   "accuracy_median": statistics.median(acc), "accuracy_min": min(acc), "accuracy_max": max(acc),
                   "dropped": statistics.mean(r["dropped"] for r in runs),
                   "lag": statistics.mean(r["lag"] for r in runs)}
            rows.append(row)
            print(f"| {trials} | {label} | {row['accuracy_median']:.3f} [{row['accuracy_min']:.3f}, "
                  f"{row['accuracy_max']:.3f}] | {row['dropped']:.1%} | {row['lag']:.1f} |", flush=True)
    print(json.dumps({"rows": rows, "wall_s": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
