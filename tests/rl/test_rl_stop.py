"""The RL stop action (issue 13): construction rules, what a stop does, what the stop head learns,
policy files with and without it, the provided trainable ending a run, and Tune with a shared policy."""

from __future__ import annotations

import math
import random

import pytest
import torch

from ray_metaopt import OptimizerWrapper
from ray_metaopt.rl import RLMetaOptimizer, save_policy
from ray_metaopt.rl.policy import PolicyConfig
from ray_metaopt.rl.reinforce import invalid_transition
from ray_metaopt.training.run import TrainingRun

STOP_ONLY = {"lr_actions": [1.0], "wd_actions": None, "stop_action": True}


def make_wrapper(meta, lr=0.1):
    param = torch.nn.Parameter(torch.zeros(2))
    return OptimizerWrapper(torch.optim.SGD([param], lr=lr), meta)


def force_stop(meta, stop: bool) -> None:
    with torch.no_grad():
        meta.learner.network.stop_head.bias.copy_(torch.tensor([-10.0, 10.0] if stop else [10.0, -10.0]))


def curve(s: int, tau: float) -> float:
    """A loss that falls fast, then flattens at 0.1: continuing is worth less and less."""
    return 0.1 + math.exp(-s / tau)


def episode(wrapper, meta, tau: float, steps: int = 200, every: int = 10) -> int:
    """One run of ``steps`` on :func:`curve`, val_loss at every decision; the steps it ran."""
    meta.reset()
    for s in range(steps):
        loss = curve(s, tau)
        metrics = {"loss": loss, "val_loss": loss} if (s + 1) % every == 0 else {"loss": loss}
        wrapper.update_hyperparameters(metrics, step=s)
        if meta.stop_requested:
            return s + 1
    meta.finish({"loss": loss, "val_loss": loss}, step=steps - 1)
    return steps


def test_stop_action_needs_a_way_to_stop_and_valid_settings():
    with pytest.raises(ValueError, match=r"stop_action=True needs a way to stop the run.*got on_stop=None"):
        RLMetaOptimizer(stop_action=True)
    with pytest.raises(TypeError, match=r"on_stop must be a callable.*got on_stop=3"):
        RLMetaOptimizer(stop_action=True, on_stop=3)
    with pytest.raises(ValueError, match="initial_stop_prob"):
        RLMetaOptimizer(stop_action=True, on_stop=print, initial_stop_prob=0.7)
    with pytest.raises(TypeError, match="stop_action must be a bool"):
        RLMetaOptimizer(stop_action=1, on_stop=print)


def test_an_untrained_frozen_stop_policy_never_stops_and_keeps_the_base_lrs():
    def lrs(**extra):
        meta = RLMetaOptimizer(seed=0, frozen=True, total_steps=200, **extra)
        wrapper = make_wrapper(meta)
        out = []
        for s in range(200):
            wrapper.update_hyperparameters({"loss": curve(s, 30.0)}, step=s)
            out.append(wrapper.param_groups[0]["lr"])
        return meta, out

    calls = []
    with_stop, stop_lrs = lrs(stop_action=True, on_stop=calls.append)
    _, plain_lrs = lrs()
    assert calls == [] and with_stop.stop_requested is None
    assert stop_lrs == plain_lrs == [0.1] * 200


def test_a_stop_ends_the_episode_calls_on_stop_once_and_is_kept_in_the_state():
    calls = []
    meta = RLMetaOptimizer(seed=0, frozen=True, total_steps=100, on_stop=calls.append, **STOP_ONLY)
    wrapper = make_wrapper(meta)
    force_stop(meta, True)
    for s in range(10):
        wrapper.update_hyperparameters({"loss": 1.0}, step=s)
    assert len(calls) == 1 and calls[0].startswith("policy_stop: the RL policy stopped the run at step 10")
    assert meta.stop_requested == calls[0] and meta.episode_done
    for s in range(10, 40):  # a caller that trains on: no more decisions, no second call
        wrapper.update_hyperparameters({"loss": 1.0}, step=s)
    assert len(calls) == 1 and wrapper.param_groups[0]["lr"] == 0.1

    state = wrapper.state_dict()
    fresh = RLMetaOptimizer(seed=0, frozen=True, total_steps=100, on_stop=print, **STOP_ONLY)
    restored = make_wrapper(fresh)
    restored.load_state_dict(state)
    assert fresh.stop_requested == calls[0]
    fresh.reset()
    assert fresh.stop_requested is None


def test_decisions_between_evaluations_count_each_val_drop_once():
    """Decisions every 10 steps, val_loss every 20, log loss falling 0.1 per 10 steps: every
    interval's stop reward is 0.1 (an evaluation's interval is not credited with the one before)."""
    meta = RLMetaOptimizer(
        update_frequency=10, total_steps=200, seed=0, return_horizon=100, batch_size=64,
        initial_stop_prob=1e-9, on_stop=print, **STOP_ONLY,
    )
    wrapper = make_wrapper(meta)
    for s in range(100):
        loss = math.exp(-0.01 * s)
        metrics = {"loss": loss, "val_loss": loss} if (s + 1) % 20 == 0 else {"loss": loss}
        wrapper.update_hyperparameters(metrics, step=s)
    rewards = [t["stop_reward"] for t in meta.pending if "stop_reward" in t]
    assert len(rewards) == 9 and rewards == pytest.approx([0.1] * 9)
    assert meta.state_dict()["state"]["stop_credit"] == 0.0  # the last decision had a val_loss


@pytest.mark.parametrize("horizon", [1, 2])
def test_a_stop_adds_the_final_term_to_the_last_decision_whatever_the_horizon(horizon):
    """The final term (the run's log val_loss improvement) goes to the decision before a stop, as
    at a normal end, also when return_horizon=1 would have finalized that decision already."""
    meta = RLMetaOptimizer(
        update_frequency=10, total_steps=200, seed=0, return_horizon=horizon, batch_size=64,
        on_stop=lambda reason: None, stop_action=True, wd_actions=None,
    )
    learned = []
    update = meta.learner.update
    meta.learner.update = lambda batch: learned.extend(batch) or update(batch)  # a spy: it still learns
    wrapper = make_wrapper(meta)
    for s in range(50):
        loss = math.exp(-0.01 * s)
        if s == 49:
            force_stop(meta, True)
        wrapper.update_hyperparameters({"loss": loss, "val_loss": loss} if (s + 1) % 10 == 0 else {"loss": loss}, step=s)
    assert meta.stop_requested
    by_decision = {t["decision"]: t for t in learned}
    assert by_decision[4]["stop"] == 1 and by_decision[4]["ret"] == 0.0
    # The last continue decision: its interval (0.1) plus the final term (log 1 - log val = 0.49 - 0.09).
    assert by_decision[3]["ret"] == pytest.approx(0.1 + 0.4)


def test_the_stop_head_learns_to_stop_where_what_is_left_costs_more_than_it_gains():
    """Local learning on :func:`curve`: with cost_weight=0.002 per step, continuing pays until about
    60% of the run (decision 11: the log-val_loss drop left equals the cost left); the frozen policy
    must stop late and never early. With cost_weight=0 it must never learn to stop."""

    def train(cost_weight: float) -> list[float]:
        meta = RLMetaOptimizer(
            update_frequency=10, total_steps=200, seed=3, policy_lr=1e-3, batch_size=16,
            initial_stop_prob=0.05, cost_metric="steps", cost_weight=cost_weight, on_stop=lambda r: None,
            **STOP_ONLY,
        )
        wrapper = make_wrapper(meta)
        rng = random.Random(0)
        for _ in range(300):
            episode(wrapper, meta, rng.uniform(20.0, 40.0))
        # p(stop) the learned policy gives at each decision of a held-out curve
        probe = RLMetaOptimizer(policy_path=None, frozen=True, total_steps=200, seed=3, on_stop=print,
                                update_frequency=10, **STOP_ONLY)
        probe.learner.load_weights(meta.learner.weights())
        seen = []
        probe._choose_stop = lambda logp: seen.append(math.exp(logp[1])) or 0
        episode(make_wrapper(probe), probe, 30.0)
        return seen

    p_stop = train(0.002)
    assert len(p_stop) == 19
    assert max(p_stop[:8]) < 0.05, p_stop  # before 40% of the run: continuing clearly pays
    assert min(p_stop[16:]) > 0.5, p_stop  # the last 15%: it costs more than it gains
    assert max(train(0.0)) < 0.05  # no cost: stopping never pays


def test_policy_files_with_and_without_a_stop_head_are_told_apart(tmp_path):
    plain = RLMetaOptimizer(seed=0)
    path = save_policy(tmp_path / "plain.pt", plain)
    with pytest.raises(ValueError, match=r"stop_action=False \(here True\)"):
        RLMetaOptimizer(policy_path=path, stop_action=True, on_stop=print)
    stopper = RLMetaOptimizer(seed=0, on_stop=print, **STOP_ONLY)
    stop_path = save_policy(tmp_path / "stop.pt", stopper)
    # from_policy takes stop_action from the file, so it must be given a way to stop
    with pytest.raises(ValueError, match="got on_stop=None"):
        RLMetaOptimizer.from_policy(stop_path)
    loaded = RLMetaOptimizer.from_policy(stop_path, on_stop=print, frozen=True)
    assert loaded.config.stop_action and torch.equal(
        loaded.learner.network.stop_head.bias, stopper.learner.network.stop_head.bias
    )
    # A policy trained without a stop head keeps its weights: the head is drawn after the others.
    with_head = PolicyConfig(seed=5, stop_action=True)
    from ray_metaopt.rl.policy import PolicyNetwork

    a, b = PolicyNetwork(PolicyConfig(seed=5)).state_dict(), PolicyNetwork(with_head).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_transitions_of_a_stop_policy_are_validated():
    config = PolicyConfig(lr_actions=[1.0], wd_actions=None, stop_action=True)
    row = [0.0] * config.state_dim
    base = {"rows": [row], "lr": [0], "wd": [-1], "logp": -0.1, "ret": 0.2, "version": 0}
    assert invalid_transition({**base, "stop": 0, "stop_ret": 0.3}, config) is None
    assert invalid_transition({**base, "lr": [-1], "stop": 1, "stop_ret": 0.0}, config) is None
    assert "stop=0 or 1" in invalid_transition(base, config)
    assert "lr action index" in invalid_transition({**base, "lr": [-1], "stop": 0, "stop_ret": 0.0}, config)
    assert "non-finite stop_ret" in invalid_transition({**base, "stop": 0, "stop_ret": math.nan}, config)
    assert "takes no lr" in invalid_transition({**base, "stop": 1, "stop_ret": 0.0}, config)
    assert "stop=0 or 1" in invalid_transition({**base, "lr": [-1], "stop": 1.0, "stop_ret": 0.0}, config)
    plain = PolicyConfig(lr_actions=[1.0], wd_actions=None)
    assert "without a stop head" in invalid_transition({**base, "stop": 0, "stop_ret": 0.0}, plain)


def test_stop_decisions_stay_out_of_the_lr_heads_terms_and_metrics():
    """A stop's return (0) is no lr decision's baseline: a batch with one differs from the same
    batch without it only in the stop head."""
    from ray_metaopt.rl.reinforce import Learner

    config = PolicyConfig(lr_actions=[0.5, 1.0, 2.0], wd_actions=None, stop_action=True, batch_size=4, seed=0)
    row = [0.1] * config.state_dim

    def decision(action, stop=0):
        return {"rows": [row], "lr": [action], "wd": [-1], "logp": math.log(1 / 3), "ret": 0.0 if stop else 1.0,
                "stop": stop, "stop_ret": 0.0, "progress": 0.5, "decision": 3, "version": 0}

    runs = []
    for batch in ([decision(0), decision(2), decision(2)], [decision(0), decision(2), decision(2), decision(-1, stop=1)]):
        learner = Learner(config)
        before = learner.network.lr_head.bias.detach().clone()
        metrics = learner.update(batch)
        runs.append((learner.network.lr_head.bias.detach() - before, metrics, learner.baseline_ema))
    (moved, plain, ema), (moved_s, with_stop, ema_s) = runs
    assert torch.allclose(moved, moved_s)
    for key in ("policy/mean_return", "policy/baseline", "policy/pg_loss", "policy/entropy"):
        assert with_stop[key] == pytest.approx(plain[key]), key
    assert ema_s == ema


def _stopping_policy(tmp_path) -> str:
    meta = RLMetaOptimizer(seed=0, on_stop=print, **STOP_ONLY)
    force_stop(meta, True)
    return str(save_policy(tmp_path / "stops.pt", meta))


def test_the_trainable_ends_a_run_its_policy_stops_and_a_restore_keeps_it_stopped(tmp_path):
    config = {
        "task": "teacher_student", "max_steps": 100, "eval_interval": 20, "meta": "rl",
        "meta_config": {**STOP_ONLY, "policy_path": _stopping_policy(tmp_path), "frozen": True},
    }
    reports = []
    saved = tmp_path / "ckpt"

    def report(result, checkpoint_dir):
        reports.append((result, checkpoint_dir is not None))
        if checkpoint_dir is not None:
            import shutil

            shutil.copytree(checkpoint_dir, saved, dirs_exist_ok=True)

    run = TrainingRun(config)
    run.train(report)
    last, checkpointed = reports[-1]
    assert [r["step"] for r, _ in reports] == [20]  # the first decision (step 20) stopped it
    assert last["stop_reason"].startswith("policy_stop: ") and last["done"] and checkpointed
    assert math.isfinite(last["val_loss"])

    again = TrainingRun(config)
    again.restore(str(saved))
    reports.clear()
    again.train(report)
    assert len(reports) == 1 and reports[0][0]["stop_reason"].startswith("policy_stop: ")


def test_a_stop_between_evaluations_evaluates_once_more_and_ends(tmp_path):
    config = {
        "task": "teacher_student", "max_steps": 100, "eval_interval": 20, "meta": "rl",
        "meta_config": {**STOP_ONLY, "update_frequency": 10, "policy_path": _stopping_policy(tmp_path),
                        "frozen": True},
    }
    reports = []
    TrainingRun(config).train(lambda result, d: reports.append(result))
    assert [r["step"] for r in reports] == [10]
    assert reports[0]["stop_reason"].startswith("policy_stop: the RL policy stopped the run at step 10")


@pytest.mark.ray
@pytest.mark.slow
def test_tune_trials_stopped_by_a_shared_learning_policy_say_so(ray_session, tmp_path):
    from ray import tune

    from ray_metaopt.rl import start_policy_actor
    from ray_metaopt.tune import metaopt_trainable

    policy = {**STOP_ONLY, "initial_stop_prob": 0.3, "batch_size": 4}
    actor = start_policy_actor("stop_test", namespace="ray_metaopt_rl_tests", policy_config=policy)
    meta_config = {**policy, "cost_metric": "steps", "cost_weight": 1e-3, "shared_policy": "stop_test",
                   "policy_namespace": "ray_metaopt_rl_tests"}
    grid = tune.Tuner(
        metaopt_trainable,
        param_space={"task": "teacher_student", "max_steps": 200, "eval_interval": 20, "meta": "rl",
                     "meta_config": meta_config, "seed": tune.grid_search(list(range(6)))},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min"),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="stop", verbose=0),
    ).fit()
    assert grid.num_errors == 0
    reasons = [r.metrics["stop_reason"] for r in grid]
    stopped = [r for r in grid if r.metrics["stop_reason"].startswith("policy_stop: ")]
    # p(stop)=0.3 at each of 9 decisions: all 6 runs reach the end with probability 0.04^6
    assert stopped and all(r.metrics["step"] < 200 and r.metrics["done"] for r in stopped), reasons
    assert set(reasons) <= {"max_steps"} | {r.metrics["stop_reason"] for r in stopped}
    stats = ray_session.get(actor.stats.remote())
    assert stats["rollouts/dropped_invalid"] == 0 and stats["rollouts/transitions"] > 0
    ray_session.kill(actor)
