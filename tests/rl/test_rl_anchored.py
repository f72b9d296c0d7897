"""Anchored actions (the default), untrained = base schedule, the circuit breaker, bad input,
and behaviour pinned for issue 17 (non-finite policy gradient, episode end, weight-decay floor)."""

from __future__ import annotations

import math

import pytest
import torch

from ray_metaopt import GroupState, OptimizerWrapper
from ray_metaopt.rl import RLMetaOptimizer, load_policy, save_policy
from ray_metaopt.rl.policy import PolicyConfig
from ray_metaopt.rl.reinforce import Learner
from ray_metaopt.rl.rewards import episode_rewards, interval_reward


def force(meta, lr_index=None, wd_index=None):
    net = meta.learner.network
    with torch.no_grad():
        if lr_index is not None:
            net.lr_head.bias.fill_(-10.0)
            net.lr_head.bias[lr_index] = 10.0
        if wd_index is not None:
            net.wd_head.bias.fill_(-10.0)
            net.wd_head.bias[wd_index] = 10.0


def sgd(lr=0.01, weight_decay=0.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr, weight_decay=weight_decay)


def lrs_of(wrapper, steps, loss=lambda s: 1.0 / (1 + s), sched=None):
    lrs, wds = [], []
    for s in range(steps):
        wrapper.update_hyperparameters({"loss": loss(s)})
        lrs.append(wrapper.param_groups[0]["lr"])
        wds.append(wrapper.param_groups[0]["weight_decay"])
        if sched is not None:
            wrapper.step()
            sched.step()
    return lrs, wds


def test_anchored_is_the_default_and_x2_never_compounds():
    meta = RLMetaOptimizer(update_frequency=10, seed=0, frozen=True, frozen_action="greedy")
    assert meta.config.action_mode == "anchored" and meta.greedy
    assert RLMetaOptimizer(frozen=True).frozen_action == "mean"  # the default readout of a frozen policy
    force(meta, lr_index=2, wd_index=1)
    lrs, _ = lrs_of(OptimizerWrapper(sgd(), meta), 50)
    assert lrs == [0.01] * 9 + [0.02] * 41  # x2 of the base, at every decision: stays 0.02


def test_anchored_actions_are_relative_to_the_base_at_that_moment():
    meta = RLMetaOptimizer(update_frequency=10, seed=0, frozen=True, frozen_action="greedy", wd_actions=None)
    w = OptimizerWrapper(sgd(), meta)
    seen = []
    for index in (2, 0, 1, 0):  # x2, x0.5, keep, x0.5
        force(meta, lr_index=index)
        for s in range(len(seen) * 10, len(seen) * 10 + 10):
            w.update_hyperparameters({"loss": 1.0 / (1 + s)})
        seen.append(w.param_groups[0]["lr"])
    assert seen == [0.02, 0.005, 0.01, 0.005]


def test_anchored_on_an_attached_scheduler_multiplies_its_value_and_keep_is_bit_exact():
    def run(index, attach=True, wrapped=True):
        torch.manual_seed(0)
        meta = RLMetaOptimizer(update_frequency=5, seed=0, frozen=True, frozen_action="greedy", wd_actions=None)
        force(meta, lr_index=index)
        opt = sgd(0.1)
        w = OptimizerWrapper(opt, meta) if wrapped else opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(w, T_max=40)
        if attach and wrapped:
            w.attach_scheduler(sched)
        lrs = []
        for s in range(40):
            if wrapped:
                w.update_hyperparameters({"loss": 1.0 / (1 + s)})
            lrs.append(w.param_groups[0]["lr"])
            w.step()
            sched.step()
        return lrs

    plain = run(1, wrapped=False)
    assert run(1) == plain  # keep: the scheduler's own values, bit for bit
    doubled = run(2)
    assert doubled[:4] == plain[:4]
    assert doubled[4:] == pytest.approx([2 * x for x in plain[4:]], rel=1e-12)  # x2 of cosine(t), no drift


def test_anchored_on_a_named_schedule_and_ramp():
    total = 100
    meta = RLMetaOptimizer(
        update_frequency=10, total_steps=total, base_schedule="linear", anchor_warmup=0.5,
        seed=0, frozen=True, frozen_action="greedy", wd_actions=None,
    )
    force(meta, lr_index=2)
    lrs, _ = lrs_of(OptimizerWrapper(sgd(), meta), total)
    for step in range(9, 89, 10):
        p = (step + 1) / total
        assert lrs[step] == pytest.approx(0.01 * (1 - p) * 2.0 ** min(1.0, p / 0.5), rel=1e-12)


def test_frozen_fresh_policy_reproduces_the_base_schedule_bit_for_bit():
    """A real model: a fresh, frozen RL meta-optimizer (defaults: lr and weight-decay heads) on a
    cosine schedule trains exactly as the optimizer alone."""

    def train(meta):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
        w = OptimizerWrapper(opt, meta) if meta is not None else opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(w, T_max=60)
        if meta is not None:
            w.attach_scheduler(sched)
        x, y = torch.randn(32, 4), torch.randn(32, 1)
        lrs = []
        for s in range(60):
            loss = torch.nn.functional.mse_loss(model(x), y)
            w.zero_grad()
            loss.backward()
            if meta is not None:
                w.update_hyperparameters({"loss": loss.detach(), "grad_norm": 1.0 + s})
            w.step()
            sched.step()
            lrs.append((w.param_groups[0]["lr"], w.param_groups[0]["weight_decay"]))
        return lrs, [p.detach().clone() for p in model.parameters()]

    for seed in range(3):
        meta = RLMetaOptimizer(update_frequency=5, seed=seed, frozen=True, total_steps=60)
        got, params = train(meta)
        ref, ref_params = train(None)
        assert got == ref
        assert all(torch.equal(a, b) for a, b in zip(params, ref_params))
        assert meta.counters["decisions"] > 5


def test_fresh_policy_greedy_action_is_keep_for_any_state():
    cfg = PolicyConfig(seed=3)
    learner = Learner(cfg)
    rows = (torch.randn(200, cfg.state_dim) * 5).clamp(-5, 5).tolist()
    lr_logp, wd_logp = learner.network.act_log_probs(rows)
    assert all(max(range(3), key=r.__getitem__) == cfg.keep_lr_index for r in lr_logp)
    assert all(max(range(3), key=r.__getitem__) == cfg.keep_wd_index for r in wd_logp)


def test_weight_decay_is_anchored_and_floored_at_zero():
    """Issue 17 item 21: the floor max(initial_wd + shift, 0) pinned on the proposal itself."""
    meta = RLMetaOptimizer(update_frequency=1, lr_actions=[1.0], wd_actions=[-1e-3], seed=0, frozen=True, frozen_action="greedy")
    group = GroupState(0, "", "", 0.01, 4e-4, 0.01, 4e-4, 2)
    (update,) = meta.update_hparams({"loss": 1.0}, 0, [group])
    assert (update.hparam, update.value) == ("weight_decay", 0.0)
    meta = RLMetaOptimizer(update_frequency=1, lr_actions=[1.0], wd_actions=[-1e-4], seed=0, frozen=True, frozen_action="greedy")
    (update,) = meta.update_hparams({"loss": 1.0}, 0, [GroupState(0, "", "", 0.01, 4e-4, 0.01, 4e-4, 2)])
    assert update.value == pytest.approx(3e-4, rel=1e-12)
    # anchored: the same shift again gives the same value (relative to the initial weight decay)
    (update,) = meta.update_hparams({"loss": 1.0}, 1, [GroupState(0, "", "", 0.01, 2e-4, 0.01, 4e-4, 2)])
    assert update.value == pytest.approx(3e-4, rel=1e-12)


def test_multiplicative_weight_decay_floor_pinned_directly():
    meta = RLMetaOptimizer(
        update_frequency=1, lr_actions=[1.0], wd_actions=[-1e-3], seed=0, frozen=True, frozen_action="greedy", action_mode="multiplicative"
    )
    (update,) = meta.update_hparams({"loss": 1.0}, 0, [GroupState(0, "", "", 0.01, 4e-4, 0.01, 4e-4, 2)])
    assert update.value == 0.0


def test_circuit_breaker_puts_the_lr_back_on_base_with_a_penalty_and_a_logged_reason():
    meta = RLMetaOptimizer(update_frequency=10, seed=0, wd_actions=None, gamma=0.0, return_horizon=1, batch_size=1000)
    w = OptimizerWrapper(sgd(), meta)
    # learning (sampling) policy: make it always pick x2
    force(meta, lr_index=2)
    loss = lambda s: 10.0 if s == 29 else 1.0  # noqa: E731
    lrs, _ = lrs_of(w, 30, loss)
    assert lrs[9] == lrs[19] == pytest.approx(0.02)
    assert lrs[29] == 0.01  # tripped at step 29: back to the base lr
    assert meta.counters["breaker_trips"] == 1
    (trip,) = [d for d in w.decisions if "circuit breaker" in d.reason]
    assert (trip.step, trip.new) == (29, 0.01)
    assert meta.ready[-1]["ret"] == -meta.reward_clip  # the action before the spike is penalised
    lrs, _ = lrs_of(w, 10, lambda s: 1.0)
    assert lrs[-1] == pytest.approx(0.02)  # the policy acts again after the trip


def test_no_breaker_when_disabled():
    meta = RLMetaOptimizer(update_frequency=10, seed=0, frozen=True, frozen_action="greedy", wd_actions=None, breaker_factor=None)
    force(meta, lr_index=2)
    lrs, _ = lrs_of(OptimizerWrapper(sgd(), meta), 30, lambda s: 10.0 if s == 29 else 1.0)
    assert lrs[29] == pytest.approx(0.02) and meta.counters["breaker_trips"] == 0


@pytest.mark.parametrize(
    ("schedule", "match"),
    [
        (lambda p: math.nan, r"base_schedule\(0.0\)=nan"),
        (lambda p: 1.0 - 2 * p, r"base_schedule\(0.55\)=-0.1"),
        (lambda p: math.inf if p > 0.9 else 1.0, r"base_schedule\(0.95\)=inf"),
        (lambda p: 1.0 / (1.0 - p), r"base_schedule\(1.0\) failed"),
    ],
)
def test_bad_base_schedule_is_rejected_at_construction(schedule, match):
    with pytest.raises(ValueError, match=match):
        RLMetaOptimizer(base_schedule=schedule, total_steps=100)


def test_anchored_named_schedule_needs_total_steps():
    with pytest.raises(ValueError, match="needs total_steps"):
        RLMetaOptimizer(base_schedule="cosine")


def test_policy_file_of_another_action_space_or_feature_layout_is_rejected(tmp_path):
    path = str(tmp_path / "p.pt")
    save_policy(path, RLMetaOptimizer(seed=0, lr_actions=[0.5, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"lr_actions=\[0.5, 1.0, 2.0\] \(here \[0.8, 1.0, 1.25\]\)"):
        RLMetaOptimizer(policy_path=path, lr_actions=[0.8, 1.0, 1.25])
    with pytest.raises(ValueError, match="action_mode='anchored' \\(here 'multiplicative'\\)"):
        RLMetaOptimizer(policy_path=path, action_mode="multiplicative")
    state = load_policy(path)
    other_layout = dict(state, features=list(reversed(state["features"])))
    with pytest.raises(ValueError, match="another state layout"):
        save_policy(str(tmp_path / "q.pt"), other_layout)
    weights = dict(state["weights"])
    weights["body.0.weight"] = torch.zeros(32, 5)
    with pytest.raises(ValueError, match=r"'body.0.weight' has shape \(32, 5\)"):
        save_policy(str(tmp_path / "q.pt"), dict(state, weights=weights, features=None))


def test_non_finite_policy_gradient_with_finite_loss_changes_nothing():
    """Issue 17 item 18: a NaN gradient (here from a gradient hook, the loss stays finite)."""
    learner = Learner(PolicyConfig(batch_size=2, seed=0))
    t = {"rows": [[0.1] * learner.config.state_dim], "lr": [1], "wd": [1], "logp": -0.5,
         "ret": 0.1, "progress": None, "decision": 0, "version": 0}
    learner.update([t, dict(t, lr=[2], ret=-0.1)])
    before = {k: v.clone() for k, v in learner.network.state_dict().items()}
    version = learner.version
    handle = learner.network.lr_head.weight.register_hook(lambda g: g * math.nan)
    metrics = learner.update([t, dict(t, lr=[2], ret=-0.1)])
    handle.remove()
    after = learner.network.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert learner.version == version and metrics["policy/skipped_updates"] == 1


def test_episode_of_99_steps_every_10_ends_on_time_and_learns_its_transitions():
    """Issue 17 item 19: decisions at 9, 19, ..., 89; the one at 89 ends the episode (89 + 10 >= 99)."""
    meta = RLMetaOptimizer(total_steps=99, update_frequency=10, seed=0, wd_actions=None, batch_size=32)
    w = OptimizerWrapper(sgd(), meta)
    lrs_of(w, 99)
    assert meta.episode_done
    assert meta.counters["decisions"] == 8  # 9..79 act; 89 only rewards and ends
    assert meta.counters["transitions"] == 8 and meta.pending == [] and meta.ready == []
    assert meta.learner.updates == 1


def test_benchmark_scores_episodes_with_the_policys_own_reward_code():
    """rewards.episode_rewards gives exactly the rewards the meta-optimizer received."""
    meta = RLMetaOptimizer(update_frequency=10, seed=0, gamma=0.0, return_horizon=1, batch_size=1000,
                           reward_clip=0.3, wd_actions=None, breaker_factor=None)
    losses = [1.0, 0.5, 0.45, 0.6, 0.3]
    steps = [9, 19, 29, 39, 49]
    for s, loss in zip(steps, losses):
        meta.update_hparams({"loss": loss}, s, [GroupState(0, "", "", 0.01, None, 0.01, None, 2)])
    got = [t["ret"] for t in meta.ready]
    expected = episode_rewards([math.log(x) for x in losses], steps, 10, reward_clip=0.3)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[0] == 0.3 and interval_reward(0.0, 1.0, 10, 10, reward_clip=0.3) == -0.3


def test_paired_reference_rewards_are_measured_against_the_reference():
    """With reference_loss / reference_val_loss in the metrics each reward subtracts the
    reference's log-loss drop over the same steps and the final term compares val_loss with the
    reference's; rewards.episode_rewards computes the same numbers."""
    meta = RLMetaOptimizer(update_frequency=10, seed=0, gamma=0.0, return_horizon=1, batch_size=1000,
                           wd_actions=None, breaker_factor=None)
    losses = [1.0, 0.5, 0.45, 0.6, 0.3]
    refs = [1.0, 0.6, 0.5, 0.5, 0.4]
    steps = [9, 19, 29, 39, 49]
    group = [GroupState(0, "", "", 0.01, None, 0.01, None, 2)]
    for s, loss, ref in zip(steps, losses, refs):
        meta.update_hparams({"loss": loss, "reference_loss": ref}, s, group)
    got = [t["ret"] for t in meta.ready]
    log = [math.log(x) for x in losses]
    ref_log = [math.log(x) for x in refs]
    assert got == pytest.approx([(log[k - 1] - log[k]) - (ref_log[k - 1] - ref_log[k]) for k in range(1, 5)], rel=1e-12)
    assert got == pytest.approx(episode_rewards(log, steps, 10, reference_log_losses=ref_log), rel=1e-12)
    assert got[0] != pytest.approx(episode_rewards(log, steps, 10)[0])
    # the final term: log(0.5 / 0.25) against the reference, not log(val0 / val)
    meta2 = RLMetaOptimizer(update_frequency=10, seed=0, gamma=0.0, return_horizon=1, batch_size=1000,
                            wd_actions=None, breaker_factor=None, total_steps=20)
    for s, loss, ref, val, ref_val in ((9, 1.0, 1.0, 0.8, 0.8), (19, 0.5, 0.5, 0.25, 0.5)):
        meta2.update_hparams({"loss": loss, "reference_loss": ref, "val_loss": val, "reference_val_loss": ref_val}, s, group)
    assert [t["ret"] for t in meta2.ready] == pytest.approx([math.log(2.0)], rel=1e-12)


def prefer(meta, probs):
    """Make the policy's lr head give these probabilities whatever the state."""
    net = meta.learner.network
    with torch.no_grad():
        net.lr_head.weight.zero_()
        net.lr_head.bias.copy_(torch.tensor(probs, dtype=torch.float32).log())


def test_mean_readout_applies_a_learned_shift_that_greedy_throws_away():
    """Keep is still the argmax (0.5 > 0.4), yet 40% of the mass moved to x0.5: the mean readout
    acts on it (x exp(0.4 log 0.5 + 0.1 log 2) = x0.812), greedy reproduces the base."""
    got = {}
    for readout in ("mean", "greedy"):
        meta = RLMetaOptimizer(update_frequency=10, seed=0, frozen=True, frozen_action=readout, wd_actions=None)
        prefer(meta, [0.4, 0.5, 0.1])
        got[readout], _ = lrs_of(OptimizerWrapper(sgd(), meta), 30)
    expected = 0.01 * math.exp(0.4 * math.log(0.5) + 0.1 * math.log(2.0))
    assert got["greedy"] == [0.01] * 30
    assert got["mean"][:9] == [0.01] * 9 and got["mean"][9:] == pytest.approx([expected] * 21, rel=1e-6)


def test_mean_readout_ignores_moves_under_one_percent():
    meta = RLMetaOptimizer(update_frequency=10, seed=0, frozen=True, wd_actions=None)  # frozen -> "mean"
    prefer(meta, [0.105, 0.8, 0.095])  # E[log a] = 0.01 x log 0.5 = -0.0069: under 1%
    lrs, _ = lrs_of(OptimizerWrapper(sgd(), meta), 30)
    assert lrs == [0.01] * 30


def test_mean_readout_of_a_single_action_head_is_that_action():
    meta = RLMetaOptimizer(update_frequency=1, lr_actions=[1.0], wd_actions=[-1e-4], seed=0, frozen=True)
    (update,) = meta.update_hparams({"loss": 1.0}, 0, [GroupState(0, "", "", 0.01, 4e-4, 0.01, 4e-4, 2)])
    assert update.value == pytest.approx(3e-4, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"frozen_action": "mean"}, "frozen_action='mean' needs frozen=True"),
        ({"frozen_action": "argmax", "frozen": True}, r"frozen_action must be one of \['mean', 'greedy', 'sample'\], got frozen_action='argmax'"),
        ({"frozen_action": "mean", "greedy": True, "frozen": True}, "greedy=True contradicts frozen_action='mean'"),
    ],
)
def test_frozen_action_is_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RLMetaOptimizer(**kwargs)


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # NaN == NaN here


def test_a_decision_that_fails_after_a_local_update_restores_the_policy_too(monkeypatch):
    """The policy is copied only when a decision is about to change it (not at every decision);
    a failure after that change still restores weights, Adam state and episode alike."""
    meta = RLMetaOptimizer(update_frequency=1, seed=0, batch_size=2, return_horizon=1, wd_actions=None)
    group = GroupState(0, "", "", 0.01, 0.0, 0.01, 0.0, 2)
    for step in range(6):
        meta.update_hparams({"loss": 1.0 / (step + 1)}, step, [group])
    updates = meta.learner.updates
    before = meta.state_dict()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(meta, "_act", broken)
    with pytest.raises(RuntimeError, match="boom"):
        meta.update_hparams({"loss": 0.1}, 6, [group])
    assert meta.learner.updates == updates
    assert _same(meta.state_dict(), before)
    monkeypatch.undo()
    meta.update_hparams({"loss": 0.1}, 6, [group])  # usable afterwards, and the update happens now
    assert meta.learner.updates >= updates
