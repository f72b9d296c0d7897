"""Multi-GPU placement: concurrent Tune trials, one per GPU (or two per GPU with 0.5 each), the
model on the trial's GPU, the shared policy actor on CPU.

In CI the session's Ray simulates 4 GPUs (``num_gpus=4``, no CUDA): Tune's scheduling and Ray's
GPU assignment are exercised for real, and only the CUDA assertions are skipped. On a machine
with GPUs, run this file as a script (``python tests/tune/test_gpu_placement.py``): it starts
Ray with the machine's real GPU count and runs the same checks with CUDA (scripts/gpu_check.sh
does that).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import torch

BARRIER_TIMEOUT_S = 45.0


@pytest.fixture(scope="module", autouse=True)
def _pickle_this_module_by_value():
    # Ray workers cannot import this test module by name: ship its functions by value.
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def placement_trainable(config):
    """Wait until every trial of the experiment runs (proves concurrency), then train the provided
    trainable's task (``TrainingRun``: its own device choice, a meta-optimizer, real steps) and
    report where it ran with every result."""
    import ray
    from ray import tune

    from ray_metaopt.tune import TrainingRun

    barrier = Path(config["_barrier_dir"])
    trial_id = tune.get_context().get_trial_id()
    started = time.time()
    (barrier / trial_id).touch()
    deadline = started + config["_barrier_timeout_s"]
    while len(list(barrier.iterdir())) < config["_num_trials"] and time.time() < deadline:
        time.sleep(0.05)
    placement = {
        "all_running": len(list(barrier.iterdir())) >= config["_num_trials"],
        "gpu_ids": json.dumps([str(g) for g in ray.get_gpu_ids()]),
        "accelerator_ids": json.dumps(ray.get_runtime_context().get_accelerator_ids().get("GPU", [])),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"),
        "cuda_available": torch.cuda.is_available(),
        "started": started,
    }
    run = TrainingRun(config)
    param = next(run.model.parameters())
    placement["param_device"] = str(param.device)
    placement["device_name"] = torch.cuda.get_device_name(param.device) if param.is_cuda else "cpu"

    def report(result, checkpoint_dir):
        tune.report({**result, **placement, "finished": time.time()})

    run.train(report)


def policy_actor_placement(ray, name: str, namespace: str) -> dict:
    """Start the shared policy actor and say which GPUs it holds and where its weights live."""
    from ray_metaopt.rl.actor import start_policy_actor

    actor = start_policy_actor(name, namespace=namespace, policy_config={"batch_size": 8})
    gpu_ids = ray.get(actor.__ray_call__.remote(lambda self: [str(g) for g in ray.get_gpu_ids()]))
    weights = ray.get(actor.weights_if_newer.remote(-1))["weights"]
    return {"actor": actor, "gpu_ids": gpu_ids, "weight_devices": sorted({t.device.type for t in weights.values()})}


def run_placement(ray, tmp_path: Path, num_trials: int, gpu_per_trial: float, cpu_per_trial: float) -> list[dict]:
    """Run ``num_trials`` concurrent trials of ``placement_trainable``; return their reports."""
    from ray import tune

    barrier = tmp_path / f"barrier-{uuid.uuid4().hex[:8]}"
    barrier.mkdir(parents=True)
    trainable = tune.with_resources(placement_trainable, {"cpu": cpu_per_trial, "gpu": gpu_per_trial})
    tuner = tune.Tuner(
        trainable,
        param_space={
            "task": "teacher_student",
            "meta": "plateau",
            # cut the lr unless val_loss improved by half since the best: decides within 40 steps
            "meta_config": {"patience": 0, "threshold": 0.5},
            "max_steps": 40,
            "eval_interval": 10,
            "checkpoint_interval": 0,
            "seed": tune.grid_search(list(range(num_trials))),
            "_barrier_dir": str(barrier),
            "_num_trials": num_trials,
            "_barrier_timeout_s": BARRIER_TIMEOUT_S,
        },
        tune_config=tune.TuneConfig(max_concurrent_trials=num_trials),
        run_config=tune.RunConfig(
            name=f"placement-{uuid.uuid4().hex[:6]}", storage_path=str(tmp_path / "results"), verbose=0
        ),
    )
    grid = tuner.fit()
    assert not grid.errors, grid.errors
    rows = [r.metrics for r in grid]
    assert len(rows) == num_trials
    return rows


def check_whole_gpus(rows: list[dict], num_gpus: int) -> None:
    ids = [tuple(json.loads(r["gpu_ids"])) for r in rows]
    assert all(len(i) == 1 for i in ids), ids
    assert sorted(i[0] for i in ids) == sorted(str(g) for g in range(num_gpus))  # distinct, all used
    assert [json.loads(r["accelerator_ids"]) for r in rows] == [list(i) for i in ids]
    # Ray hands each trial its own GPU through CUDA_VISIBLE_DEVICES
    assert sorted(r["cuda_visible_devices"] for r in rows) == sorted(str(g) for g in range(num_gpus))
    check_concurrent(rows)


def check_fractional_gpus(rows: list[dict], num_gpus: int) -> None:
    """0.5 GPU per trial, 2 x (GPUs to fill) trials: Ray packs two trials on each GPU it uses."""
    ids = [tuple(json.loads(r["gpu_ids"])) for r in rows]
    assert all(len(i) == 1 for i in ids), ids
    used = Counter(i[0] for i in ids)
    assert len(used) == len(rows) // 2 <= num_gpus
    assert set(used.values()) == {2}, used  # every GPU in use is shared by exactly two trials
    assert set(used) <= {str(g) for g in range(num_gpus)}
    assert Counter(r["cuda_visible_devices"] for r in rows) == used
    check_concurrent(rows)


def check_concurrent(rows: list[dict]) -> None:
    assert all(r["all_running"] for r in rows), "not every trial ran at the same time"
    assert max(r["started"] for r in rows) < min(r["finished"] for r in rows)


def check_devices(rows: list[dict]) -> None:
    """The model lives on the trial's GPU when there is CUDA (else on CPU, and nothing to check)."""
    for r in rows:
        if r["cuda_available"]:
            # the one GPU Ray made visible to this trial is its cuda:0
            assert r["device"] == "cuda" and r["param_device"] == "cuda:0", r
            assert r["device_name"] != "cpu"
        else:
            assert r["device"] == "cpu" and r["param_device"] == "cpu", r
        assert r["step"] == 40 and not r["diverged"]
        assert math.isfinite(r["val_loss"])
        assert r["meta/num_decisions"] >= 1, r  # the meta-optimizer acted inside the trial


def _num_gpus(ray) -> int:
    return int(ray.cluster_resources().get("GPU", 0))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.gpu
def test_one_trial_per_gpu(ray_session, tmp_path):
    ray = ray_session
    num_gpus = _num_gpus(ray)
    assert num_gpus >= 2, "the session's Ray should expose (simulated or real) GPUs"
    policy = policy_actor_placement(ray, f"placement-{uuid.uuid4().hex[:6]}", "ray_metaopt_tests")
    try:
        rows = run_placement(ray, tmp_path, num_gpus, gpu_per_trial=1, cpu_per_trial=min(1, 4 / num_gpus))
        check_whole_gpus(rows, num_gpus)
        check_devices(rows)
        # the policy actor holds no GPU (else one trial could not have started) and its policy is on CPU
        assert policy["gpu_ids"] == []
        assert policy["weight_devices"] == ["cpu"]
    finally:
        ray.kill(policy["actor"])


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.gpu
def test_two_trials_per_gpu_with_half_gpus(ray_session, tmp_path):
    ray = ray_session
    num_gpus = _num_gpus(ray)
    # Fill two of the GPUs (four trials): enough to see the sharing, half the worker start-ups.
    rows = run_placement(ray, tmp_path, 4, gpu_per_trial=0.5, cpu_per_trial=0.5)
    check_fractional_gpus(rows, num_gpus)
    check_devices(rows)


def main() -> int:
    """Run the placement checks on this machine's real GPUs (scripts/gpu_check.sh); without CUDA,
    on 2 simulated GPUs (the CUDA assertions then do not apply)."""
    import tempfile

    import ray

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cuda = torch.cuda.is_available()
    num_gpus = torch.cuda.device_count() if cuda else 2
    if not cuda:
        print("no CUDA: 2 simulated GPUs, CUDA assertions skipped")
    ray.init(
        address="local", num_cpus=max(4, 2 * num_gpus), num_gpus=num_gpus, include_dashboard=False, log_to_driver=False
    )
    expected = "cuda" if cuda else "cpu"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            policy = policy_actor_placement(ray, "gpu-check-policy", "ray_metaopt")
            rows = run_placement(ray, tmp_path, num_gpus, gpu_per_trial=1, cpu_per_trial=1)
            check_whole_gpus(rows, num_gpus)
            check_devices(rows)
            assert all(r["device"] == expected for r in rows), rows
            assert policy["gpu_ids"] == [] and policy["weight_devices"] == ["cpu"], policy
            print(f"{num_gpus} trials x 1 GPU: OK", [(r["gpu_ids"], r["param_device"], r["device_name"]) for r in rows])
            rows = run_placement(ray, tmp_path, 2 * num_gpus, gpu_per_trial=0.5, cpu_per_trial=1)
            check_fractional_gpus(rows, num_gpus)
            check_devices(rows)
            assert all(r["device"] == expected for r in rows), rows
            print(
                f"{2 * num_gpus} trials x 0.5 GPU: OK",
                [(r["gpu_ids"], r["param_device"], r["device_name"]) for r in rows],
            )
            print(f"policy actor: GPUs {policy['gpu_ids']}, weights on {policy['weight_devices']}")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
