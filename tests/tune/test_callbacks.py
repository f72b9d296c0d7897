"""MetaOptCallback: trajectories recorded and written per trial in a real Tune run, policy stats
polled without blocking the Tune loop, the shared policy actor created at setup and saved at the end."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time

import pytest
import ray
import torch
from ray import tune

from ray_metaopt import OptimizerWrapper
from ray_metaopt.plateau import PlateauMetaOptimizer
from ray_metaopt.tune.callbacks import (
    DECISIONS_CSV,
    TRAJECTORY_CSV,
    TRAJECTORY_JSON,
    MetaOptCallback,
    read_trajectory,
    write_trajectory,
)


@pytest.fixture(scope="module", autouse=True)
def _pickle_this_module_by_value():
    # Ray workers cannot import this test module by name: ship its functions by value.
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _two_group_trainable(config):
    """Real training of a 2-layer net with two named param groups and a plateau meta-optimizer;
    reports the provided trainable's keys at every evaluation."""
    torch.manual_seed(config["seed"])
    x = torch.randn(128, 4)
    y = x.sum(dim=1, keepdim=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    inner = torch.optim.AdamW(
        [
            {"params": model[0].parameters(), "name": "body", "lr": config["lr"]},
            {"params": model[2].parameters(), "name": "head", "lr": config["lr"] / 10, "weight_decay": 0.0},
        ],
        weight_decay=0.01,
    )
    opt = OptimizerWrapper(
        inner, PlateauMetaOptimizer(patience=0, lr_factor=0.5, threshold=0.5, update_frequency=4, noise_aware=False)
    )
    best = math.inf
    reported = 0
    step = 0
    for _ in range(config["evals"]):
        for _ in range(4):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.update_hyperparameters({"loss": loss.detach()}, step=step)
            opt.step()
            step += 1
        val = float(loss)
        best = min(best, val)
        decisions = opt.decisions
        new = [d.to_dict() for d in decisions[reported:]]
        reported = len(decisions)
        metrics = {
            "step": step,
            "train_loss": float(loss),
            "val_loss": val,
            "best_val_loss": best,
            "lr": opt.param_groups[0]["lr"],
            "meta/num_decisions": opt.log.num_decisions,
            "meta/num_skipped": opt.log.num_skipped,
            "meta/decisions": new,
            "diverged": False,
            "lr_at_floor": False,
            "steps_per_second": 100.0,
        }
        for g in opt.param_groups:
            metrics[f"lr/{g['name']}"] = g["lr"]
            metrics[f"weight_decay/{g['name']}"] = g["weight_decay"]
        tune.report(metrics)


@pytest.mark.ray
@pytest.mark.slow
def test_trajectories_recorded_and_written_per_trial(ray_session, tmp_path):
    callback = MetaOptCallback(trajectory_dir=str(tmp_path / "traj"), write_interval_s=0.0)
    evals = 5
    tuner = tune.Tuner(
        tune.with_resources(_two_group_trainable, {"cpu": 1}),
        param_space={"seed": tune.grid_search([0, 1]), "lr": 0.05, "evals": evals, "meta": "plateau"},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min"),
        run_config=tune.RunConfig(
            storage_path=str(tmp_path / "storage"), name="cb", callbacks=[callback], verbose=0
        ),
    )
    grid = tuner.fit()
    assert not grid.errors
    assert len(callback.trajectories) == 2
    for result in grid:
        trial_id = result.metrics["trial_id"]
        trajectory = callback.trajectories[trial_id]
        assert trajectory["status"] == "TERMINATED"
        assert trajectory["config"]["meta"] == "plateau"
        assert trajectory["config"]["seed"] == result.config["seed"]
        records = trajectory["records"]
        # One record per report, with the reported values.
        history = result.metrics_dataframe
        assert [r["step"] for r in records] == list(history["step"]) == [4 * (i + 1) for i in range(evals)]
        assert [r["lr/body"] for r in records] == pytest.approx(list(history["lr/body"]))
        assert [r["lr/head"] for r in records] == pytest.approx(list(history["lr/head"]))
        assert [r["weight_decay/head"] for r in records] == [0.0] * evals
        assert [r["val_loss"] for r in records] == pytest.approx(list(history["val_loss"]))
        # The decisions are every applied change, once each, for both groups.
        decisions = trajectory["decisions"]
        assert len(decisions) == result.metrics["meta/num_decisions"] > 0
        assert {d["name"] for d in decisions} == {"body", "head"}
        for d in decisions:
            assert d["hparam"] == "lr" and d["new"] == pytest.approx(d["old"] * 0.5)
        # lr trajectory and decisions agree: the last decision's value is the last lr of its group.
        last_head = [d for d in decisions if d["name"] == "head"][-1]
        assert records[-1]["lr/head"] == pytest.approx(last_head["new"])

        # Files in the trial directory, synced by Tune into storage_path.
        trial_dir = result.path
        on_disk = read_trajectory(os.path.join(trial_dir, TRAJECTORY_JSON))
        assert on_disk == json.loads(json.dumps(trajectory))
        with open(os.path.join(trial_dir, TRAJECTORY_CSV)) as f:
            rows = list(csv.DictReader(f))
        assert [int(r["step"]) for r in rows] == [r["step"] for r in records]
        assert [float(r["lr/body"]) for r in rows] == pytest.approx([r["lr/body"] for r in records])
        with open(os.path.join(trial_dir, DECISIONS_CSV)) as f:
            assert len(list(csv.DictReader(f))) == len(decisions)
        # And the user-chosen directory.
        assert read_trajectory(tmp_path / "traj" / f"{trial_id}.json") == on_disk
        assert os.path.exists(tmp_path / "traj" / f"{trial_id}.csv")


def test_write_and_read_trajectory_keep_non_finite_values(tmp_path, monkeypatch):
    trajectory = {
        "trial_id": "abc",
        "config": {"meta": "plateau"},
        "status": "TERMINATED",
        "records": [
            {"step": 1, "val_loss": 1.0, "lr": 0.1},
            {"step": 2, "val_loss": float("nan"), "diverged": True},
        ],
        "decisions": [
            {"step": 1, "group": 0, "name": "", "hparam": "lr", "old": 0.2, "new": 0.1, "reason": "plateau"}
        ],
    }
    write_trajectory(trajectory, tmp_path / "t.json", tmp_path / "t.csv", tmp_path / "d.csv")
    with open(tmp_path / "t.json") as f:
        json.load(f)  # standard JSON: no bare NaN
    back = read_trajectory(tmp_path / "t.json")
    assert math.isnan(back["records"][1]["val_loss"])
    back["records"][1]["val_loss"] = trajectory["records"][1]["val_loss"] = 0.0
    assert back == trajectory
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "val_loss", "lr", "diverged"]
    with open(tmp_path / "d.csv") as f:
        assert next(csv.DictReader(f))["reason"] == "plateau"
    # No temp file ever sits in the trial directory (Tune's syncer copies it while trials run).
    seen = []
    real_replace = os.replace

    def watching(src, dst):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", watching)
    write_trajectory(trajectory, tmp_path / "t.json")
    assert seen == [["d.csv", "t.csv", "t.json"]]


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"policy_name": ""}, TypeError, "policy_name=''"),
        ({"policy_config": {"policy_lr": 1e-3}}, ValueError, "policy_name is None"),
        ({"policy_save_path": "p.pt"}, ValueError, "no policy to save"),
        ({"policy_name": "p", "policy_config": [1]}, TypeError, r"policy_config=\[1\]"),
        ({"stats_interval_s": -1}, ValueError, "stats_interval_s=-1"),
        ({"stats_timeout_s": 0}, ValueError, "stats_timeout_s=0"),
        ({"max_restarts": -2}, ValueError, "max_restarts=-2"),
        ({"add_policy_stats_to_results": 1}, TypeError, "add_policy_stats_to_results=1"),
    ],
)
def test_bad_arguments(kwargs, error, words):
    with pytest.raises(error, match=words):
        MetaOptCallback(**kwargs)


@ray.remote(num_cpus=0)
class _SlowStats:
    """A real actor whose ``stats`` takes a while, as a busy policy actor's can."""

    def __init__(self):
        self.calls = 0

    def stats(self):
        self.calls += 1
        time.sleep(1.0)
        return {
            "policy/version": self.calls,
            "policy/updates": 10 * self.calls,
            "rollouts/transitions_per_trial": {},
        }


@pytest.mark.ray
def test_stats_polling_never_blocks_the_tune_loop(ray_session):
    callback = MetaOptCallback(stats_interval_s=0.0)
    callback.policy_actor = _SlowStats.remote()
    t0 = time.monotonic()
    callback.on_step_end(iteration=1, trials=[])  # sends the first request
    callback.on_step_end(iteration=2, trials=[])  # reply not there yet: returns at once
    assert time.monotonic() - t0 < 0.5
    assert callback.policy_stats is None
    deadline = time.monotonic() + 15
    while callback.policy_stats is None and time.monotonic() < deadline:
        t = time.monotonic()
        callback.on_step_end(iteration=3, trials=[])
        assert time.monotonic() - t < 0.5
        time.sleep(0.1)
    assert callback.policy_stats == {
        "policy/version": 1,
        "policy/updates": 10,
        "rollouts/transitions_per_trial": {},
    }
    # Only scalar stats go into results; a pending reply is collected by the final fetch.
    assert callback._scalar_policy_stats() == {"policy/version": 1, "policy/updates": 10}
    assert callback.fetch_policy_stats(timeout=10)["policy/version"] >= 2
    assert len(callback.policy_stats_history) >= 2


@pytest.mark.ray
@pytest.mark.slow
def test_shared_policy_created_at_setup_fed_by_trials_and_saved(ray_session, tmp_path):
    from ray_metaopt.rl import load_policy
    from ray_metaopt.tune import trainable_with_resources

    name = "test_callback_policy"
    save_path = tmp_path / "policy" / "final.pt"
    callback = MetaOptCallback(
        policy_name=name,
        policy_namespace="ray_metaopt_cb_test",
        policy_save_path=save_path,
        stats_interval_s=0.0,
    )
    meta = {
        "rl": {"shared_policy": name, "policy_namespace": "ray_metaopt_cb_test", "update_frequency": 5},
        "none": {},
    }
    space = {
        "task": "teacher_student",
        "meta": tune.grid_search(["rl", "rl", "none"]),
        "meta_config": tune.sample_from(lambda config: meta[config["meta"]]),
        "max_steps": 80,
        "eval_interval": 20,
    }
    grid = tune.Tuner(
        trainable_with_resources({"cpu": 1}),
        param_space=space,
        run_config=tune.RunConfig(
            storage_path=str(tmp_path / "storage"), name="rl", callbacks=[callback], verbose=0
        ),
    ).fit()
    assert not grid.errors

    # Created by the driver at setup, outside every trial: still alive after all trials ended.
    actor = ray.get_actor(name, namespace="ray_metaopt_cb_test")
    live = ray.get(actor.stats.remote())
    rl_ids = {r.metrics["trial_id"] for r in grid if r.config["meta"] == "rl"}
    assert len(rl_ids) == 2
    assert live["rollouts/transitions"] > 0
    # Rollouts arrived from both rl trials (keys are the trials' source ids; one per trial).
    assert len(live["rollouts/transitions_per_trial"]) == 2

    # The final stats were fetched at the end, and the results of rl trials carry them.
    assert callback.policy_stats is not None
    assert callback.policy_stats["rollouts/transitions"] == live["rollouts/transitions"]
    for result in grid:
        has_shared = any(k.startswith("shared/") for k in result.metrics)
        assert has_shared == (result.config["meta"] == "rl")
        if has_shared:  # in progress.csv too: its header is fixed at the first result (issue 16)
            with open(os.path.join(result.path, "progress.csv")) as f:
                header = f.readline().strip().split(",")
            assert "shared/policy/version" in header and "stop_reason" in header

    # Saved with save_policy; load_policy reads it back.
    assert callback.saved_policy_path == str(save_path)
    assert load_policy(str(save_path)) is not None
    ray.kill(actor)


class _Trial:
    """What the callback reads from a trial, for tests that drive its hooks directly."""

    def __init__(self, trial_id, local_path):
        self.trial_id = trial_id
        self.config = {"meta": "plateau", "seed": 3}
        self.local_path = str(local_path)


def _decision(step, new):
    return {
        "step": step,
        "group": 0,
        "name": "",
        "hparam": "lr",
        "old": 2 * new,
        "new": new,
        "reason": "plateau",
    }


def test_a_restored_trial_replaces_the_rerun_part_of_its_trajectory(tmp_path):
    callback = MetaOptCallback(write_interval_s=0.0)
    trial = _Trial("r1", tmp_path / "r1")
    callback.on_trial_start(0, [], trial)
    reports = [
        {"step": 10, "val_loss": 1.0, "lr": 0.1, "meta/decisions": []},
        {"step": 20, "val_loss": 0.9, "lr": 0.05, "meta/decisions": [_decision(19, 0.05)]},
        {"step": 30, "val_loss": 0.8, "lr": 0.025, "meta/decisions": [_decision(29, 0.025)]},
        # Restored from the checkpoint at step 20: steps 21..30 run again, differently.
        {"step": 30, "val_loss": 0.85, "lr": 0.05, "meta/decisions": []},
        {"step": 40, "val_loss": 0.7, "lr": 0.025, "meta/decisions": [_decision(39, 0.025)]},
    ]
    for r in reports:
        callback.on_trial_result(0, [], trial, r)
    t = callback.trajectories["r1"]
    assert [(r["step"], r["val_loss"]) for r in t["records"]] == [(10, 1.0), (20, 0.9), (30, 0.85), (40, 0.7)]
    assert [d["step"] for d in t["decisions"]] == [19, 39]
    callback.on_trial_complete(0, [], trial)
    assert read_trajectory(tmp_path / "r1" / TRAJECTORY_JSON)["records"] == t["records"]
    # every report stays in reported_steps (the compute the trial used: 40 + the 10 steps re-run)
    assert t["reported_steps"] == [10, 20, 30, 30, 40]
    from ray_metaopt.bench.stats import executed_steps

    assert executed_steps(t["reported_steps"], 10) == 50
    assert (t["diverged"], t["error"], t["finished"]) == (False, None, 0)
    # Tune's experiment checkpoint carries the trajectories to a restored driver.
    restored = MetaOptCallback()
    restored.set_state(callback.get_state())
    assert restored.trajectories == callback.trajectories
    failed = _Trial("r2", tmp_path / "r2")
    failed.error_msg = "Traceback (most recent call last):\n  ...\nValueError: lr=nan"
    restored.on_trial_result(0, [], failed, {"step": 10, "val_loss": math.nan, "diverged": True})
    restored.on_trial_error(0, [], failed)
    t2 = restored.trajectories["r2"]
    assert (t2["status"], t2["diverged"], t2["error"], t2["finished"]) == ("ERROR", True, "ValueError: lr=nan", 1)


@pytest.mark.ray
def test_a_replaced_policy_actor_is_found_again_by_name(ray_session, tmp_path):
    """Issue 17 item 13: after the actor is killed and started again under its name, the callback's
    stats and its saved policy come from the new actor instead of failing on the old handle."""
    from ray_metaopt.rl import load_policy, start_policy_actor

    namespace = "ray_metaopt_tests_replaced"
    callback = MetaOptCallback(policy_name="replaced", policy_namespace=namespace)
    callback.setup()
    assert callback.fetch_policy_stats(timeout=30)["policy/version"] == 0
    old = callback.policy_actor
    ray.kill(old, no_restart=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the name is free once the kill has gone through
        try:
            ray.get_actor("replaced", namespace=namespace)
        except ValueError:
            break
        time.sleep(0.1)
    new = start_policy_actor("replaced", namespace=namespace)
    seen = len(callback.policy_stats_history)
    stats = callback.fetch_policy_stats(timeout=30)
    assert len(callback.policy_stats_history) == seen + 1 and stats["policy/version"] == 0
    assert callback.policy_actor is not old
    path = callback.save_policy(tmp_path / "policy.pt")
    assert path is not None and load_policy(path)["name"] == "replaced"
    ray.kill(new)
