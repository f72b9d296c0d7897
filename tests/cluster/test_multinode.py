"""A real two-node Ray cluster on 127.0.0.1 runs the shared-policy experiment, fed from both
nodes, and survives losing its worker node.

The test starts its own cluster (``ray start --head`` + ``ray start --address``, separate temp
dirs, token authentication) with :class:`local_cluster.LocalRayCluster`, runs
``shared_policy_driver.py`` against it in a subprocess, and stops every process it started, also
when the test fails. The pytest process's own local Ray (``ray_session``) is never involved.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from local_cluster import LocalRayCluster

DRIVER = Path(__file__).with_name("shared_policy_driver.py")
DRIVER_TIMEOUT_S = 150


def _driver_failure(cluster: LocalRayCluster, driver) -> str:
    return (
        f"driver exit code {driver.returncode}\n--- driver\n{cluster.tail(driver.log_path, 60)}\n"
        f"--- head\n{cluster.tail(cluster.node('head'))}\n{cluster.raylet_logs(15)}"
    )


def _wait_driver(cluster: LocalRayCluster, driver, timeout: float) -> None:
    try:
        driver.wait(timeout=timeout)
    except Exception:
        pytest.fail(f"driver still running after {timeout}s\n" + _driver_failure(cluster, driver))
    assert driver.returncode == 0, _driver_failure(cluster, driver)


def _check_completed(result: dict, max_steps: int) -> None:
    assert result["num_errors"] == 0, result["trials"]
    for trial in result["trials"]:
        assert trial["error"] is None, trial
        assert trial["step"] == max_steps and not trial["diverged"], trial
        assert trial["decisions"] >= 1  # the RL strategy acted


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return rows


@pytest.mark.cluster
@pytest.mark.slow
def test_experiment_survives_losing_the_worker_node(tmp_path):
    out, work = tmp_path / "result.json", tmp_path / "work"
    max_steps, eval_interval = 160, 20
    with LocalRayCluster() as cluster:
        # one CPU per node, two one-CPU trials: one on each node; the worker's trial is retried
        # on the head once the head's own trial is done
        cluster.start_head(num_cpus=1)
        cluster.add_worker(num_cpus=1)
        driver = cluster.start_driver(
            DRIVER,
            *("--out", str(out), "--work-dir", str(work), "--trials", "2"),
            *("--max-steps", str(max_steps), "--eval-interval", str(eval_interval), "--pause-s", "0.4"),
        )
        # Kill the worker node once its trial has checkpointed twice (mid-run: it has 8
        # evaluations), the policy has learned something, and the worker's trial has fed it.
        deadline = time.monotonic() + 90
        stats_at_kill = None
        while time.monotonic() < deadline:
            if driver.poll() is not None:
                pytest.fail("driver ended before the kill\n" + _driver_failure(cluster, driver))
            nodes_file = work / "nodes.json"
            stats = [s for s in _read_jsonl(work / "stats.jsonl") if "error" not in s]
            if nodes_file.exists() and stats and stats[-1]["policy/version"] >= 1:
                worker = json.loads(nodes_file.read_text())["worker1"]
                on_worker = {
                    p.stem
                    for p in (work / "progress").glob("*.jsonl")
                    if any(r["node_id"] == worker and r["step"] >= 2 * eval_interval for r in _read_jsonl(p))
                }
                # ... and the actor has counted rollouts from the worker's trial (stats are polled,
                # so on a loaded machine they can lag the trial's own progress)
                fed = stats[-1].get("rollouts/transitions_per_trial", {})
                if any(fed.get(tid, 0) > 0 for tid in on_worker):
                    stats_at_kill = stats[-1]
                    break
            time.sleep(0.2)
        assert stats_at_kill is not None, "no worker-node checkpoint in time\n" + _driver_failure(cluster, driver)
        killed_at = time.time()
        cluster.kill_node("worker1")
        assert cluster.processes("worker1") == []
        _wait_driver(cluster, driver, DRIVER_TIMEOUT_S)
    assert cluster.processes() == []

    result = json.loads(out.read_text())
    nodes = result["nodes"]
    _check_completed(result, max_steps)  # every trial finished despite the lost node

    # the trials that were on the worker were retried from their checkpoints on the head
    moved = [t for t in result["trials"] if nodes["worker1"] in t["node_ids"]]
    assert len(moved) == 1, result["trials"]  # the worker's one CPU held one trial
    for trial in moved:
        on_worker = [h for h in trial["history"] if h[0] == nodes["worker1"]]
        on_head = [h for h in trial["history"] if h[0] == nodes["head"]]
        assert on_worker and on_head, trial
        assert trial["history"].index(on_worker[-1]) < trial["history"].index(on_head[0])  # moved once
        assert all(h[2] == -1 for h in on_worker)  # first attempt started fresh
        resumed_from = {h[2] for h in on_head}
        assert len(resumed_from) == 1, trial
        step = resumed_from.pop()
        # resumed from a checkpoint the worker wrote (every evaluation), not from step 0
        assert 0 < step <= on_worker[-1][1] and step % eval_interval == 0, trial
        assert on_head[0][1] == step + eval_interval and on_head[-1][1] == max_steps
    for trial in result["trials"]:
        if trial not in moved:  # ran on the head only, every evaluation reported once
            assert [h[0] for h in trial["history"]] == [nodes["head"]] * (max_steps // eval_interval)
            assert [h[1] for h in trial["history"]] == list(range(eval_interval, max_steps + 1, eval_interval))

    # Before the kill, one shared policy learned from both nodes: the actor is on the head, its
    # rollout sources are the Tune trial ids, and the worker's trial had fed it from the worker.
    # (The clean two-node run without a kill: tests/cluster/test_job_submission.py.)
    first_node = {t["trial_id"]: t["history"][0][0] for t in result["trials"]}
    assert sorted(first_node.values()) == sorted(nodes.values())  # one trial started on each node
    assert result["actor_node"] == nodes["head"]
    at_kill = stats_at_kill["rollouts/transitions_per_trial"]
    assert set(at_kill) <= set(first_node), at_kill
    assert nodes["worker1"] in {first_node[tid] for tid, count in at_kill.items() if count > 0}, at_kill
    assert set(result["final_stats"]["rollouts/transitions_per_trial"]) == set(first_node)
    assert all(count > 0 for count in result["final_stats"]["rollouts/transitions_per_trial"].values())

    # the policy actor kept its learning: never restarted, version and counters never went back
    final = result["final_stats"]
    assert final["actor/restores"] == 0
    assert final["policy/version"] >= stats_at_kill["policy/version"] >= 1
    history = [s for s in _read_jsonl(work / "stats.jsonl") if "error" not in s]
    versions = [s["policy/version"] for s in history]
    assert versions == sorted(versions)
    after_kill = [s for s in history if s["time"] > killed_at]
    assert after_kill and min(s["policy/version"] for s in after_kill) >= stats_at_kill["policy/version"]
    for trial_id, count in stats_at_kill["rollouts/transitions_per_trial"].items():
        assert final["rollouts/transitions_per_trial"][trial_id] >= count
    # and kept learning from the resumed trials
    assert final["rollouts/transitions"] > stats_at_kill["rollouts/transitions"]
