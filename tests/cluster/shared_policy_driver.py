"""Driver of the multi-node tests: the shared-policy experiment against an existing Ray cluster.

Run by tests/cluster/test_multinode.py in a subprocess (never in the pytest process, which
holds its own local Ray):

    python tests/cluster/shared_policy_driver.py --address HOST:PORT --out result.json \\
        --work-dir DIR [--trials 2] [--max-steps 200] [--pause-s 0.3]

It connects with ``ray.init(address=...)`` (token from ``RAY_AUTH_TOKEN``), waits for every
expected node, starts the shared :class:`~ray_metaopt.rl.PolicyActor` pinned to the head node
(custom resource ``node_head``, so it survives the loss of a worker node), and runs ``--trials``
Tune trials of the provided training loop (:class:`~ray_metaopt.tune.TrainingRun`, the loop of
``metaopt_trainable``) with ``meta="rl"`` learning through that actor, checkpointing at every
evaluation, with ``FailureConfig(max_failures=...)``. Each trial reports the node it runs on
and, after a restore, the step it resumed from. While Tune runs, a thread appends the actor's
stats to ``DIR/stats.jsonl``; at the end the driver writes every trial's results and the
actor's final stats to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

POLICY = "cluster-policy"
NAMESPACE = "ray_metaopt"
POLICY_CONFIG = {"batch_size": 8, "policy_lr": 1e-3}


def traced_trainable(config):
    """``metaopt_trainable`` (TrainingRun + Tune checkpoints) that also reports where it runs.

    After each evaluation it appends a line (node, step, step restored from, checkpointed) to
    ``<progress_dir>/<trial_id>.jsonl`` and pauses ``_pause_s`` seconds, so a test can act while
    trials are mid-run. The file keeps every attempt's lines (Tune's own result.json of a
    restored trial restarts at the checkpoint); the nodes share this machine's filesystem.
    """
    import ray
    from ray import tune

    from ray_metaopt.tune import TrainingRun

    node_id = ray.get_runtime_context().get_node_id()
    trial_id = tune.get_context().get_trial_id()
    run = TrainingRun(config)
    restored_from = -1
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            run.restore(directory)
        restored_from = run.step
    progress = Path(config["_progress_dir"]) / f"{trial_id}.jsonl"

    def report(result, checkpoint_dir):
        result = {**result, "node_id": node_id, "restored_from_step": restored_from, "pid": os.getpid()}
        ckpt = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir is not None else None
        line = {"node_id": node_id, "step": result["step"], "restored_from_step": restored_from}
        # Written before the report: Tune stops the trial as soon as it takes the last one (done).
        with open(progress, "a") as f:
            f.write(json.dumps({**line, "checkpointed": ckpt is not None, "time": time.time()}) + "\n")
        tune.report(result, checkpoint=ckpt)
        time.sleep(config["_pause_s"])

    run.train(report)


def wait_for_nodes(ray, expected: int, timeout: float) -> dict[str, str]:
    """Node name (from its ``node_<name>`` resource) -> node id, once ``expected`` nodes are alive."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        names = {}
        for node in alive:
            tags = [k[len("node_"):] for k in node["Resources"] if k.startswith("node_")]
            if tags:
                names[tags[0]] = node["NodeID"]
        if len(names) >= expected:
            return names
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(names)} of {expected} nodes alive: {names}")
        time.sleep(0.2)


def poll_stats(actor, path: Path, stop: threading.Event) -> None:
    import ray

    with open(path, "a") as f:
        while not stop.is_set():
            try:
                stats = ray.get(actor.stats.remote(), timeout=5)
                f.write(json.dumps({"time": time.time(), **stats}) + "\n")
                f.flush()
            except Exception as err:  # noqa: BLE001 - record and keep polling
                f.write(json.dumps({"time": time.time(), "error": repr(err)}) + "\n")
            stop.wait(0.25)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--eval-interval", type=int, default=20)
    parser.add_argument("--pause-s", type=float, default=0.3)
    parser.add_argument("--max-failures", type=int, default=3)
    args = parser.parse_args(argv)

    import ray
    from ray import tune

    from ray_metaopt.rl import start_policy_actor

    work = Path(args.work_dir)
    (work / "progress").mkdir(parents=True, exist_ok=True)
    ray.init(address=args.address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    nodes = wait_for_nodes(ray, args.nodes, timeout=60)
    (work / "nodes.json").write_text(json.dumps(nodes))

    actor = start_policy_actor(
        POLICY,
        namespace=NAMESPACE,
        policy_config=POLICY_CONFIG,
        checkpoint_uri=str(work / "policy_checkpoint"),
        # on the head node: a worker node's loss must not take the policy with it
        actor_options={"resources": {"node_head": 0.01}},
    )
    actor_node = ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
    stop = threading.Event()
    poller = threading.Thread(target=poll_stats, args=(actor, work / "stats.jsonl", stop), daemon=True)
    poller.start()

    tuner = tune.Tuner(
        tune.with_resources(traced_trainable, {"cpu": 1}),
        param_space={
            "task": "teacher_student",
            "meta": "rl",
            "meta_config": {
                "shared_policy": POLICY,
                "policy_namespace": NAMESPACE,
                "update_frequency": 5,
                "segment_size": 4,
                "reconnect_interval_s": 0.5,
            },
            "optimizer_config": {"lr": 3e-3},
            "max_steps": args.max_steps,
            "eval_interval": args.eval_interval,
            "checkpoint_interval": 1,
            "seed": tune.grid_search(list(range(args.trials))),
            "_progress_dir": str(work / "progress"),
            "_pause_s": args.pause_s,
        },
        tune_config=tune.TuneConfig(max_concurrent_trials=args.trials),
        run_config=tune.RunConfig(
            name="shared_policy",
            storage_path=str(work / "results"),
            failure_config=tune.FailureConfig(max_failures=args.max_failures),
            verbose=0,
        ),
    )
    started = time.time()
    grid = tuner.fit()
    elapsed = time.time() - started
    time.sleep(0.5)  # let the last fire-and-forget segments reach the actor
    stop.set()
    poller.join(timeout=10)
    final_stats = ray.get(actor.stats.remote())

    trials = []
    for result in grid:
        trial_id = result.metrics.get("trial_id")
        path = work / "progress" / f"{trial_id}.jsonl"
        history = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        trials.append(
            {
                "trial_id": trial_id,
                "error": None if result.error is None else repr(result.error),
                "step": result.metrics.get("step"),
                "diverged": result.metrics.get("diverged"),
                "decisions": result.metrics.get("meta/num_decisions"),
                # every attempt's reports, in order: (node, step, step restored from)
                "history": [[h["node_id"], h["step"], h["restored_from_step"]] for h in history],
                "node_ids": sorted({h["node_id"] for h in history}),
            }
        )
    out = {
        "nodes": nodes,
        "actor_node": actor_node,
        "trials": trials,
        "num_errors": len(grid.errors),
        "final_stats": final_stats,
        "elapsed_s": elapsed,
    }
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
