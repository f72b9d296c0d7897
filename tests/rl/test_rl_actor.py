"""The shared PolicyActor: aggregation, staleness, checkpoints, and real Ray trials feeding it."""

from __future__ import annotations

import math
import sys
import time

import pytest
import torch

from ray_metaopt.rl import PolicyActor, RLMetaOptimizer, load_policy, save_policy, start_policy_actor
from ray_metaopt.rl.actor import CHECKPOINT_FILE, WRITER_FILE, get_policy_actor
from ray_metaopt.rl.policy import PolicyConfig

NAMESPACE = "ray_metaopt_rl_tests"
STATS_KEYS = {
    "policy/version",
    "policy/updates",
    "policy/entropy",
    "policy/mean_return",
    "rollouts/transitions",
    "rollouts/transitions_per_trial",
    "rollouts/dropped_stale",
    "rollouts/version_lag_mean",
}


def transitions(n, *, version=0, ret=None, cfg=None):
    cfg = cfg or PolicyConfig()
    return [
        {
            "rows": [[0.01 * i] * cfg.state_dim],
            "lr": [i % 3],
            "wd": [(i + 1) % 3],
            "logp": math.log(1 / 9),
            "ret": float(i % 5) if ret is None else ret,
            "progress": (i % 10) / 10,
            "decision": i,
            "version": version,
        }
        for i in range(n)
    ]


# ------------------------------------------------------------------ the actor as a plain object
def test_actor_updates_once_per_batch_and_counts_per_trial():
    actor = PolicyActor("a", {"batch_size": 8, "policy_lr": 1e-3})
    assert actor.submit(transitions(5), source="t1") == 0  # not a batch yet
    assert actor.submit(transitions(5), source="t2") == 1
    assert actor.submit(transitions(14), source="t1") == 3
    stats = actor.stats()
    assert STATS_KEYS <= set(stats)
    assert stats["policy/updates"] == 3 and stats["rollouts/transitions"] == 24
    assert stats["rollouts/transitions_per_trial"] == {"t1": 19, "t2": 5}
    assert stats["rollouts/buffered"] == 0 and math.isfinite(stats["policy/entropy"])


def test_by_default_every_valid_transition_is_learned_from_however_stale():
    actor = PolicyActor("s", {"batch_size": 4, "policy_lr": 1e-3})
    assert actor.max_staleness is None
    for v in range(100):
        actor.submit(transitions(4, version=v))
    stale = transitions(4, version=0)  # 100 versions behind (e.g. a trial that lost contact)
    for t in stale:
        t["logp"] = -30.0
    actor.submit(stale)
    stats = actor.stats()
    assert stats["rollouts/dropped_stale"] == 0 and stats["rollouts/transitions"] == 404
    assert actor.learner.version == 101  # learned from them, importance weight clipped at the default 2
    assert actor.learner.last_metrics["policy/importance_weight"] == pytest.approx(2.0)


def test_max_staleness_is_validated():
    with pytest.raises(ValueError, match="max_staleness"):
        PolicyActor("s", {"batch_size": 4}, max_staleness=-1)


def test_stale_rollouts_are_dropped_beyond_the_bound_and_importance_weighted_within_it():
    actor = PolicyActor("s", {"batch_size": 4, "policy_lr": 1e-3}, max_staleness=2, importance_clip=1.5)
    for v in range(3):
        actor.submit(transitions(4, version=v))
    assert actor.learner.version == 3
    actor.submit(transitions(4, version=0))  # lag 3 > 2: dropped
    assert actor.stats()["rollouts/dropped_stale"] == 4 and actor.learner.version == 3
    stale = transitions(4, version=1)  # lag 2: used, importance-weighted
    for t in stale:
        t["logp"] = -30.0  # the acting policy found these actions very unlikely
    actor.submit(stale)
    stats = actor.stats()
    assert actor.learner.version == 4 and stats["rollouts/dropped_stale"] == 4
    assert actor.learner.last_metrics["policy/importance_weight"] == pytest.approx(1.5)
    assert stats["rollouts/version_lag_mean"] == pytest.approx((0 + 0 + 0 + 3 * 4 + 2 * 4) / 20)


def test_non_finite_and_malformed_rollouts_are_skipped_and_counted():
    actor = PolicyActor("n", {"batch_size": 4})
    bad = transitions(3, ret=math.nan) + transitions(1, ret=math.inf) + [{"rows": "x"}, 42]
    assert actor.submit(bad + transitions(2)) == 0
    assert actor.submit("not a list") == 0
    stats = actor.stats()
    assert stats["rollouts/dropped_invalid"] == 6 + 1 and stats["rollouts/transitions"] == 2
    assert stats["rollouts/segments"] == 2 and stats["rollouts/buffered"] == 2


def test_checkpoint_and_restore(tmp_path):
    cfg = {"batch_size": 4, "policy_lr": 1e-2}
    actor = PolicyActor("c", cfg, checkpoint_uri=str(tmp_path))
    actor.submit(transitions(10), source="t")
    assert actor.stats()["actor/checkpoints"] == 2 and (tmp_path / CHECKPOINT_FILE).exists()
    assert actor.checkpoint() == str(tmp_path / CHECKPOINT_FILE)  # on request, buffer included

    again = PolicyActor("c", cfg, checkpoint_uri=str(tmp_path))
    assert again.restored_version == 2 and again.stats()["actor/restores"] == 1
    assert len(again.buffer) == 2 and again.stats()["rollouts/transitions_per_trial"] == {"t": 10}
    w1, w2 = actor.learner.weights(), again.learner.weights()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    actor.submit(transitions(2))
    again.submit(transitions(2))  # both continue identically from there
    w1, w2 = actor.learner.weights(), again.learner.weights()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)

    with pytest.raises(ValueError, match=r"was written by a policy with lr_actions=\[0.5, 1.0, 2.0\] \(here \[0.5, 2.0\]\)"):
        PolicyActor("c", {"lr_actions": [0.5, 2.0]}, checkpoint_uri=str(tmp_path))


def test_checkpoint_to_a_pyarrow_uri(tmp_path):
    uri = f"file://{tmp_path}/remote/ckpt"
    actor = PolicyActor("u", {"batch_size": 2}, checkpoint_uri=uri)
    actor.submit(transitions(2))
    assert (tmp_path / "remote" / "ckpt" / CHECKPOINT_FILE).exists()
    assert PolicyActor("u", {"batch_size": 2}, checkpoint_uri=uri).restored_version == 1


def test_actor_starts_from_a_saved_policy(tmp_path):
    meta = RLMetaOptimizer(seed=5, hidden_size=8)
    path = save_policy(tmp_path / "p.pt", meta)
    actor = PolicyActor("p", {"hidden_size": 8}, policy_path=path)
    w1, w2 = meta.learner.weights(), actor.learner.weights()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    with pytest.raises(ValueError, match="hidden_size"):
        PolicyActor("p", {"hidden_size": 16}, policy_path=path)


def test_weights_if_newer():
    actor = PolicyActor("w", {"batch_size": 2})
    first = actor.weights_if_newer(-1)
    assert first["version"] == 0 and first["signature"] == PolicyConfig().signature()
    assert actor.weights_if_newer(0) is None
    actor.submit(transitions(2))
    assert actor.weights_if_newer(0)["version"] == 1


# ------------------------------------------------------------------ with real Ray
@pytest.fixture(scope="module", autouse=True)
def _pickle_this_module_by_value():
    # Ray workers cannot import this test module by name: ship its classes by value.
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


POLICY = {"batch_size": 16, "policy_lr": 1e-3}


class _Trial:
    """One training process: a real model, an RLMetaOptimizer that shares the policy actor."""

    def ready(self):
        import ray_metaopt.rl  # noqa: F401 - imports done before the clock starts

        return True

    def run(self, name, seed, steps, sleep_s=0.0):
        import torch

        from ray_metaopt import OptimizerWrapper
        from ray_metaopt.rl import RLMetaOptimizer

        torch.set_num_threads(1)
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        x = torch.randn(64, 8)
        y = (2 * x[:, :1]).sin()
        meta = RLMetaOptimizer(
            update_frequency=5,
            total_steps=steps,
            seed=seed,
            shared_policy=name,
            policy_namespace=NAMESPACE,
            segment_size=4,
            sync_interval_s=0.05,
            reconnect_interval_s=0.2,
            **POLICY,
        )
        wrapper = OptimizerWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2), meta)
        for _ in range(steps):
            loss = (model(x) - y).pow(2).mean()
            wrapper.zero_grad()
            loss.backward()
            wrapper.update_hyperparameters({"loss": loss.detach()})
            wrapper.step()
            if sleep_s:
                time.sleep(sleep_s)
        meta.finish(timeout_s=20.0)
        return meta.stats()


def start_trials(ray, n):
    trial_cls = ray.remote(num_cpus=1)(_Trial)
    trials = [trial_cls.remote() for _ in range(n)]
    ray.get([t.ready.remote() for t in trials], timeout=120)  # all processes up: the runs overlap
    return trials


@pytest.mark.ray
def test_start_is_idempotent_and_checks_the_config(ray_session):
    ray = ray_session
    a = start_policy_actor("idem", namespace=NAMESPACE, policy_config={"batch_size": 4})
    b = start_policy_actor("idem", namespace=NAMESPACE, policy_config={"batch_size": 4})
    assert a._actor_id == b._actor_id == get_policy_actor("idem", namespace=NAMESPACE)._actor_id
    with pytest.raises(ValueError, match="already runs"):
        start_policy_actor("idem", namespace=NAMESPACE, policy_config={"batch_size": 8})
    with pytest.raises(ValueError, match="no policy actor named 'nope'"):
        get_policy_actor("nope", namespace=NAMESPACE)
    with pytest.raises(ValueError, match="unknown keys"):
        start_policy_actor("bad", namespace=NAMESPACE, policy_config={"lr": 1.0})
    assert ray.get(a.submit.remote(transitions(2, ret=math.nan) + transitions(2), "driver")) == 0
    stats = ray.get(a.stats.remote())
    assert STATS_KEYS <= set(stats)
    assert stats["rollouts/dropped_invalid"] == 2 and stats["rollouts/transitions"] == 2
    ray.kill(a)


@pytest.mark.ray
@pytest.mark.slow
def test_four_concurrent_trials_feed_one_policy(ray_session, tmp_path):
    ray = ray_session
    actor = start_policy_actor("four", namespace=NAMESPACE, policy_config=POLICY)
    trials = start_trials(ray, 4)
    results = ray.get([t.run.remote("four", seed, 300, 0.003) for seed, t in enumerate(trials)], timeout=180)
    stats = ray.get(actor.stats.remote())
    per_trial = stats["rollouts/transitions_per_trial"]
    assert len(per_trial) == 4 and all(n >= 20 for n in per_trial.values()), per_trial
    # Every transition sent is accounted for: learned from, or dropped as too stale.
    sent = sum(r["rl/sent_transitions"] for r in results)
    assert sent == 4 * (300 // 5 - 1)
    assert stats["rollouts/transitions"] + stats["rollouts/dropped_stale"] == sent
    assert stats["rollouts/dropped_invalid"] == 0 and stats["rollouts/version_lag_mean"] > 0
    assert stats["policy/updates"] == stats["rollouts/transitions"] // POLICY["batch_size"]
    assert stats["policy/version"] >= 10 and math.isfinite(stats["policy/entropy"])
    # Trials picked up new weights while they trained.
    assert all(r["rl/client_weight_updates"] >= 2 and r["policy/version"] >= 1 for r in results)
    assert all(r["rl/client_actor_errors"] == 0 for r in results)

    path = save_policy(tmp_path / "shared.pt", actor)
    state = torch.load(path, weights_only=True)
    assert state["version"] == stats["policy/version"]
    frozen = RLMetaOptimizer(policy_path=path, frozen=True, greedy=True, **POLICY)
    remote = ray.get(actor.policy_state.remote())["weights"]
    assert all(torch.equal(remote[k], frozen.learner.weights()[k]) for k in remote)
    assert load_policy(path)["name"] == "four"
    for handle in [*trials, actor]:
        ray.kill(handle)


@pytest.mark.ray
@pytest.mark.slow
def test_killing_the_actor_mid_run_fails_no_trial_and_loses_at_most_one_interval(ray_session, tmp_path):
    ray = ray_session
    actor = start_policy_actor(
        "kill", namespace=NAMESPACE, policy_config=POLICY, checkpoint_uri=str(tmp_path), max_restarts=-1
    )
    trials = start_trials(ray, 2)
    runs = [t.run.remote("kill", seed, 1200, 0.004) for seed, t in enumerate(trials)]
    deadline = time.monotonic() + 120
    before = 0
    while before < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
        before = ray.get(actor.stats.remote())["policy/version"]
    assert before >= 3, "trials did not feed the actor"
    ray.kill(actor, no_restart=False)  # Ray restarts it; it restores from its checkpoint

    results = ray.get(runs, timeout=180)  # no trial failed
    stats = ray.get(actor.stats.remote())
    assert stats["actor/restores"] == 1
    # Checkpointed after every update: the restart resumes from at least the version seen before the kill.
    assert stats["actor/restored_version"] >= before
    assert stats["policy/version"] > stats["actor/restored_version"]  # and learning went on
    assert len(stats["rollouts/transitions_per_trial"]) == 2
    # Every decision point acted (a circuit-breaker trip is a decision that returns to the base lr).
    acted = [r["rl/decisions"] + r["rl/breaker_trips"] for r in results]
    assert acted == [1200 // 5 - 1] * 2, acted
    # Sends that failed while the actor was away were re-queued and delivered to the restarted
    # actor: what is lost is at most what it had buffered since its last checkpoint (one update per
    # batch, checkpointed each time), i.e. under one batch. Old code: 296 of 461 lost here.
    sent = sum(r["rl/sent_transitions"] for r in results)
    received = sum(stats["rollouts/transitions_per_trial"].values())
    print(f"actor kill: {received} of {sent} transitions received")
    assert sent - received <= POLICY["batch_size"] - 1, (received, sent, results)
    for handle in [*trials, actor]:
        ray.kill(handle)


@pytest.mark.ray
def test_a_trial_without_its_actor_trains_on_and_counts_what_it_could_not_send(ray_session):
    meta = RLMetaOptimizer(
        update_frequency=2,
        seed=0,
        shared_policy="absent",
        policy_namespace=NAMESPACE,
        segment_size=1,
        return_horizon=1,
        reconnect_interval_s=60.0,
    )
    params = [torch.nn.Parameter(torch.ones(3))]
    from ray_metaopt import OptimizerWrapper

    wrapper = OptimizerWrapper(torch.optim.SGD(params, lr=0.1), meta)
    for step in range(100):
        wrapper.update_hyperparameters({"loss": 1.0 / (step + 1)})
    stats = meta.stats()
    assert stats["rl/decisions"] == 50 and stats["rl/client_connected"] is False
    assert stats["rl/sent_transitions"] == 49  # the last action has no reward yet
    assert stats["rl/client_outbox"] == 32 and stats["rl/client_segments_dropped"] == 49 - 32
    assert stats["policy/version"] == 0  # acted with its initial weights


@pytest.mark.ray
def test_a_trial_with_another_action_space_is_told_clearly(ray_session):
    actor = start_policy_actor("other", namespace=NAMESPACE, policy_config={"lr_actions": [0.5, 2.0]})
    meta = RLMetaOptimizer(
        update_frequency=1, seed=0, shared_policy="other", policy_namespace=NAMESPACE, sync_interval_s=0.05
    )
    from ray_metaopt.base import GroupState

    groups = [GroupState(0, "", "", 0.1, 0.0, 0.1, 0.0, 3)]
    with pytest.raises(ValueError, match=r"started with lr_actions=\[0.5, 2.0\]"):
        for step in range(200):
            meta.update_hparams({"loss": 1.0}, step, groups)
            time.sleep(0.01)
    ray_session.kill(actor)


@pytest.mark.ray
def test_a_newer_actor_on_the_same_checkpoint_uri_is_its_only_writer(ray_session, tmp_path):
    """Issue 17 item 14: an orphan actor (its driver SIGKILLed) must not overwrite the checkpoints of
    the actor a restored experiment starts on the same URI. Two live actors stand for the two."""
    ray = ray_session
    orphan = start_policy_actor("orphan", namespace=NAMESPACE, policy_config=POLICY, checkpoint_uri=str(tmp_path))
    assert ray.get(orphan.checkpoint.remote()) is not None
    restored = start_policy_actor("restored", namespace=NAMESPACE, policy_config=POLICY, checkpoint_uri=str(tmp_path))
    assert ray.get(restored.stats.remote())["actor/restores"] == 1  # it resumed from the orphan's file
    assert (tmp_path / WRITER_FILE).is_file()
    written = (tmp_path / CHECKPOINT_FILE).read_bytes()
    assert ray.get(orphan.checkpoint.remote()) is None  # superseded: writes nothing
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == written
    assert ray.get(orphan.stats.remote())["actor/checkpoints_refused"] == 1
    assert ray.get(restored.checkpoint.remote()) == str(tmp_path / CHECKPOINT_FILE)
    assert ray.get(restored.stats.remote())["actor/checkpoints_refused"] == 0
    for handle in (orphan, restored):
        ray.kill(handle)


@pytest.mark.ray
def test_sends_made_while_a_call_is_in_flight_go_out_as_one_batch(ray_session):
    """Issue 17 item 15: a client makes one call at a time; what arrives meanwhile waits in a batch
    that goes out whole when the call has landed, or early once it holds ``max_batch``."""
    from ray_metaopt.rl.actor import PolicyClient

    actor = start_policy_actor("batching", namespace=NAMESPACE, policy_config=POLICY)
    with pytest.raises(ValueError, match=r"max_batch must be >= 1, got max_batch=0"):
        PolicyClient("batching", NAMESPACE, max_batch=0)
    client = PolicyClient("batching", NAMESPACE, max_batch=10, source="batch-test")
    for i in range(25):  # no poll in between: the first call stays unacknowledged
        client.send(transitions(1))
    stats = client.stats()
    # 1 alone, then two full batches of 10; 4 still waiting for the calls in flight.
    assert stats["segments_sent"] == 3 and stats["batched"] == 4, stats
    client.drain(timeout_s=30.0)
    stats = client.stats()
    assert stats["segments_sent"] == 4 and stats["batched"] == 0 and stats["inflight"] == 0, stats
    received = ray_session.get(actor.stats.remote())["rollouts/transitions_per_trial"]
    assert received == {"batch-test": 25}
    ray_session.kill(actor)
