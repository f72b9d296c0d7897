"""RLMetaOptimizer in one process: actions as lr/wd sequences, rewards, learning, resume, persistence."""

from __future__ import annotations

import io
import math

import pytest
import torch

from ray_metaopt import AdaptiveFrequency, GroupState, OptimizerWrapper
from ray_metaopt.rl import RLMetaOptimizer, load_policy, save_policy
from ray_metaopt.rl.features import GLOBAL_FEATURES


def force_actions(meta, lr_index=None, wd_index=None):
    """Make the (frozen, greedy) policy always pick these actions whatever the state."""
    net = meta.learner.network
    with torch.no_grad():
        if lr_index is not None:
            net.lr_head.bias.fill_(-10.0)
            net.lr_head.bias[lr_index] = 10.0
        if wd_index is not None:
            net.wd_head.bias.fill_(-10.0)
            net.wd_head.bias[wd_index] = 10.0


def make_wrapper(meta, lr=0.01, weight_decay=0.0, groups=1):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    opt = torch.optim.SGD([{"params": [p]} for p in params], lr=lr, weight_decay=weight_decay)
    return OptimizerWrapper(opt, meta)


def run(wrapper, steps, loss=lambda s: 1.0 / (1 + s)):
    lrs, wds = [], []
    for s in range(steps):
        wrapper.update_hyperparameters({"loss": loss(s)})
        lrs.append(wrapper.param_groups[0]["lr"])
        wds.append(wrapper.param_groups[0]["weight_decay"])
    return lrs, wds


def test_the_seed_example_constructs():
    meta = RLMetaOptimizer(
        update_frequency=10,
        lr_actions=[0.5, 1.0, 2.0],
        wd_actions=[-1e-5, 0.0, 1e-5],
        policy_lr=1e-4,
        entropy_weight=0.01,
    )
    assert meta.update_frequency == 10 and meta.config.lr_actions == (0.5, 1.0, 2.0)
    assert "RLMetaOptimizer(update_frequency=10" in repr(meta)


def test_multiplicative_actions_compound_within_bounds():
    """x2 and +1e-5 at every decision (steps 9, 19, ...); lr capped at 10x its initial value."""
    meta = RLMetaOptimizer(update_frequency=10, seed=0, frozen=True, greedy=True, action_mode="multiplicative")
    force_actions(meta, lr_index=2, wd_index=2)
    lrs, wds = run(make_wrapper(meta), 50)
    expected_lr = [0.01] * 9 + [0.02] * 10 + [0.04] * 10 + [0.08] * 10 + [0.1] * 11
    expected_wd = [0.0] * 9 + [1e-5] * 10 + [2e-5] * 10 + [3e-5] * 10 + [4e-5] * 10 + [5e-5] * 1
    assert lrs == pytest.approx(expected_lr, rel=1e-12)
    assert wds == pytest.approx(expected_wd, abs=1e-15)


def test_weight_decay_never_goes_negative():
    meta = RLMetaOptimizer(update_frequency=5, seed=0, frozen=True, greedy=True, action_mode="multiplicative")
    force_actions(meta, lr_index=1, wd_index=0)
    lrs, wds = run(make_wrapper(meta, weight_decay=2e-5), 30)
    assert wds == pytest.approx([2e-5] * 4 + [1e-5] * 5 + [0.0] * 21, abs=1e-15)
    assert lrs == [0.01] * 30  # "keep" proposes nothing


def test_schedule_mode_scales_a_cosine_within_bounds():
    """lr = initial * cosine(progress) * scale, scale doubled at each decision up to 4; no action at the end."""
    total = 60
    meta = RLMetaOptimizer(
        update_frequency=10, action_mode="schedule", total_steps=total, seed=0, frozen=True, greedy=True
    )
    force_actions(meta, lr_index=2, wd_index=1)
    lrs, _ = run(make_wrapper(meta), total)

    def cosine(step):
        return 0.5 * (1 + math.cos(math.pi * (step + 1) / total))

    expected = [0.01] * 9
    for decision, step in enumerate(range(9, 59, 10)):
        scale = min(2.0 ** (decision + 1), 4.0)
        expected += [0.01 * cosine(step) * scale] * 10
    expected += [expected[-1]]  # step 59 ends the episode: no action
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_schedule_mode_with_keep_follows_the_schedule_exactly():
    meta = RLMetaOptimizer(
        update_frequency=10,
        action_mode="schedule",
        base_schedule="linear",
        total_steps=40,
        seed=0,
        frozen=True,
        greedy=True,
    )
    force_actions(meta, lr_index=1, wd_index=1)
    lrs, _ = run(make_wrapper(meta), 40)
    assert lrs == pytest.approx([0.01] * 9 + [0.0075] * 10 + [0.005] * 10 + [0.0025] * 11, rel=1e-12)


def test_per_group_actions_differ_by_group():
    """A policy that halves an lr above its start and doubles one below: per group, each group
    gets its own action; globally, the mean lr ratio is 0 and both keep."""

    def build(per_group):
        meta = RLMetaOptimizer(
            update_frequency=1, wd_actions=None, seed=0, frozen=True, greedy=True, per_group=per_group
        )
        net = meta.learner.network
        lr_feature = len(GLOBAL_FEATURES)  # log_lr_ratio
        with torch.no_grad():
            for p in net.parameters():
                p.zero_()
            net.body[0].weight[0, lr_feature] = 1.0
            net.body[2].weight[0, 0] = 1.0
            net.lr_head.weight[:, 0] = torch.tensor([10.0, 0.0, -10.0])  # lr above start -> x0.5
            net.lr_head.bias[1] = 1.0  # at the start -> keep
        wrapper = make_wrapper(meta, groups=2)
        wrapper.param_groups[0]["lr"] = 0.02  # changed by hand after wrapping
        wrapper.param_groups[1]["lr"] = 0.005
        return wrapper

    per_group = build(True)
    per_group.update_hyperparameters({"loss": 1.0})
    assert [g["lr"] for g in per_group.param_groups] == pytest.approx([0.01, 0.01])
    both = build(False)
    both.update_hyperparameters({"loss": 1.0})
    assert [g["lr"] for g in both.param_groups] == pytest.approx([0.02, 0.005])


def test_per_group_transitions_hold_one_row_per_group():
    meta = RLMetaOptimizer(update_frequency=1, seed=0, per_group=True, batch_size=1000, return_horizon=1)
    wrapper = make_wrapper(meta, groups=3)
    run(wrapper, 5)
    assert all(len(t["rows"]) == 3 and len(t["lr"]) == 3 for t in meta.ready)


def decide_sequence(meta, points, groups=None):
    groups = groups or [GroupState(0, "", "", 0.01, 0.0, 0.01, 0.0, 1)]
    for step, metrics in points:
        meta.update_hparams(metrics, step, groups)


@pytest.mark.parametrize(
    ("kwargs", "points", "expected"),
    [
        # log-loss improvement over the interval
        (
            {},
            [(9, {"loss": 1.0}), (19, {"loss": math.exp(-0.2)}), (29, {"loss": math.exp(-0.2)})],
            [0.2, 0.0],
        ),
        # per update_frequency steps: a 20-step interval with the same drop is worth half
        (
            {},
            [(9, {"loss": 1.0}), (29, {"loss": math.exp(-0.2)}), (39, {"loss": math.exp(-0.3)})],
            [0.1, 0.1],
        ),
        # cost: 0.5 per second per 10 steps of 0.01 s
        (
            {"cost_weight": 0.5},
            [
                (9, {"loss": 1.0, "step_time": 0.01}),
                (19, {"loss": math.exp(-0.2), "step_time": 0.01}),
                (29, {"loss": math.exp(-0.2), "step_time": 0.02}),
            ],
            [0.15, -0.1],
        ),
        (
            {"cost_weight": 0.01, "cost_metric": "steps"},
            [(9, {"loss": 1.0}), (19, {"loss": 1.0}), (29, {"loss": 1.0})],
            [-0.1, -0.1],
        ),
        # divergence is clipped
        (
            {"reward_clip": 1.0, "breaker_factor": None},
            [(9, {"loss": 1.0}), (19, {"loss": math.exp(10.0)}), (29, {"loss": math.exp(10.0)})],
            [-1.0, 0.0],
        ),
        # a loss floor: log(loss - floor)
        (
            {"loss_floor": 1.0},
            [(9, {"loss": 2.0}), (19, {"loss": 1.0 + math.exp(-1.0)}), (29, {"loss": 1.0 + math.exp(-1.0)})],
            [1.0, 0.0],
        ),
    ],
)
def test_rewards(kwargs, points, expected):
    meta = RLMetaOptimizer(
        update_frequency=10, seed=0, gamma=0.0, return_horizon=1, batch_size=1000, **kwargs
    )
    decide_sequence(meta, points)
    assert [t["ret"] for t in meta.ready] == pytest.approx(expected, abs=1e-12)


def test_returns_discount_later_rewards_and_the_episode_end_adds_the_val_loss_term():
    meta = RLMetaOptimizer(
        update_frequency=10,
        seed=0,
        gamma=0.5,
        return_horizon=3,
        batch_size=1000,
        total_steps=50,
        val_weight=2.0,
    )
    losses = [1.0, math.exp(-0.4), math.exp(-0.6), math.exp(-0.7), math.exp(-0.7)]
    points = [(9 + 10 * i, {"loss": loss}) for i, loss in enumerate(losses)]
    points[0][1]["val_loss"] = 1.0
    points[-1][1]["val_loss"] = math.exp(-0.25)  # final term 2.0 * 0.25 on the last rewarded action
    learned = []  # the episode's end learns from what is left: record what it learns from
    meta.learner.update = lambda transitions: learned.extend(transitions) or {}
    decide_sequence(meta, points)
    rewards = [0.4, 0.2, 0.1, 0.0 + 0.5]
    expected = [
        rewards[0] + 0.5 * rewards[1] + 0.25 * rewards[2],
        rewards[1] + 0.5 * rewards[2] + 0.25 * rewards[3],
        rewards[2] + 0.5 * rewards[3],  # truncated by the episode's end
        rewards[3],
    ]
    assert [t["ret"] for t in learned] == pytest.approx(expected, abs=1e-12)
    assert meta.episode_done and meta.pending == [] and meta.ready == []


def test_adaptive_frequency_composes_with_rl():
    """A plateau doubles the interval (10, 20, 40, 40): decisions at 9, 19, 39, 79, 119; the
    interval reaches the policy as a feature; rewards are per 10 steps."""
    meta = RLMetaOptimizer(
        update_frequency=10,
        seed=0,
        gamma=0.0,
        return_horizon=1,
        batch_size=1000,
        adaptive_frequency=AdaptiveFrequency(min_interval=5, max_interval=40),
    )
    wrapper = make_wrapper(meta)
    decision_steps = []
    for s in range(125):
        before = meta.counters["decisions"]
        wrapper.update_hyperparameters({"loss": math.exp(-1e-6 * s)})
        if meta.counters["decisions"] > before:
            decision_steps.append(s)
    assert decision_steps == [9, 19, 39, 79, 119]
    interval_index = GLOBAL_FEATURES.index("log_interval")
    assert [t["rows"][0][interval_index] for t in meta.ready] == pytest.approx([0.0, 0.0, 1.0, 2.0])
    assert [t["ret"] for t in meta.ready] == pytest.approx([1e-5] * 4, rel=1e-6)


def test_missing_loss_is_a_clear_error():
    meta = RLMetaOptimizer(update_frequency=1, seed=0)
    with pytest.raises(ValueError, match="needs the metric 'loss'.*\\['val_loss'\\]"):
        meta.update_hparams({"val_loss": 1.0}, 0, [])


def test_non_finite_loss_skips_the_decision_without_a_transition():
    meta = RLMetaOptimizer(update_frequency=1, seed=0, batch_size=1000, return_horizon=1)
    wrapper = make_wrapper(meta)
    wrapper.update_hyperparameters({"loss": 1.0})
    wrapper.update_hyperparameters({"loss": math.nan})
    wrapper.update_hyperparameters({"loss": math.inf})
    assert wrapper.log.num_skipped == 2
    assert meta.counters["decisions"] == 1 and len(meta.pending) == 1 and meta.ready == []
    wrapper.update_hyperparameters({"loss": 0.5})
    assert [t["ret"] for t in meta.ready] == pytest.approx(
        [math.log(2.0) / 3]
    )  # 3 steps since the last decision


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragment"),
    [
        ({"lr_actions": []}, ValueError, "lr_actions must hold at least one action"),
        ({"wd_actions": []}, ValueError, "wd_actions must hold at least one action"),
        ({"lr_actions": [-0.5, 2.0]}, ValueError, "lr_actions"),
        ({"policy_lr": -1e-4}, ValueError, "policy_lr"),
        ({"entropy_weight": -0.01}, ValueError, "entropy_weight"),
        ({"update_frequency": 0}, ValueError, "update_frequency"),
        ({"greedy": True}, ValueError, "greedy=True needs frozen=True"),
        ({"frozen": 1}, TypeError, "frozen"),
        ({"action_mode": "schedule"}, ValueError, "needs total_steps"),
        ({"action_mode": "bandit"}, ValueError, "action_mode"),
        ({"base_schedule": "step"}, ValueError, "base_schedule"),
        ({"lr_scale_bounds": (2.0, 3.0)}, ValueError, r"lr_scale_bounds\[0\]"),
        ({"lr_scale_bounds": (0.5, 0.8)}, ValueError, r"lr_scale_bounds\[1\]"),
        ({"lr_scale_bounds": 0.5}, TypeError, "lr_scale_bounds"),
        ({"cost_weight": -1.0}, ValueError, "cost_weight"),
        ({"reward_clip": 0.0}, ValueError, "reward_clip"),
        ({"total_steps": 0}, ValueError, "total_steps"),
        ({"seed": -3}, ValueError, "seed"),
        ({"shared_policy": ""}, TypeError, "shared_policy"),
        ({"segment_size": 0}, ValueError, "segment_size"),
        ({"importance_clip": 0.5}, ValueError, "importance_clip"),
    ],
)
def test_bad_arguments(kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        RLMetaOptimizer(**kwargs)


def train_steps(wrapper, model, x, y, start, stop):
    for _ in range(start, stop):
        loss = (model(x) - y).pow(2).mean()
        wrapper.zero_grad()
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        wrapper.update_hyperparameters({"loss": loss.detach(), "grad_norm": gn})
        wrapper.step()


def test_resume_from_wrapper_state_dict_is_bit_for_bit():
    """Learning locally (policy updates every 4 transitions); checkpoint at step 120 through
    torch.save / torch.load(weights_only=True); the resumed run decides exactly as the original."""

    def build(seed):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        meta = RLMetaOptimizer(
            update_frequency=5,
            seed=seed,
            policy_lr=1e-2,
            batch_size=4,
            return_horizon=3,
            total_steps=300,
            per_group=True,
        )
        wrapper = OptimizerWrapper(
            torch.optim.AdamW(
                [{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=1e-2
            ),
            meta,
        )
        return model, meta, wrapper

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=gen)
    y = x.sum(1, keepdim=True).sin()
    model, meta, wrapper = build(seed=11)
    train_steps(wrapper, model, x, y, 0, 120)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": wrapper.state_dict()}, buffer)
    train_steps(wrapper, model, x, y, 120, 300)

    model2, meta2, wrapper2 = build(seed=None)  # a different (random) seed: the state dict carries it
    ckpt = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    model2.load_state_dict(ckpt["model"])
    wrapper2.load_state_dict(ckpt["optimizer"])
    train_steps(wrapper2, model2, x, y, 120, 300)

    assert meta.learner.updates > 10 and meta2.learner.updates == meta.learner.updates
    after = [d for d in wrapper.decisions if d.step >= 120]
    assert len(after) > 5
    assert [(d.step, d.group, d.hparam, d.new) for d in after] == [
        (d.step, d.group, d.hparam, d.new) for d in wrapper2.decisions if d.step >= 120
    ]
    w1, w2 = meta.learner.network.state_dict(), meta2.learner.network.state_dict()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert meta.state_dict()["state"]["draws"] == meta2.state_dict()["state"]["draws"]


def synthetic_episode(meta, lr0=0.0125, steps=300, best_lr=0.1):
    """A 'training run' whose loss falls fastest at lr = best_lr (log-distance penalty)."""
    lr, loss = lr0, 1.0
    for step in range(steps):
        loss *= math.exp(-0.01 * max(0.0, 1 - abs(math.log2(lr / best_lr)) / 4))
        if meta.should_update(step):
            for u in meta.update_hparams(
                {"loss": loss}, step, [GroupState(0, "", "", lr, None, lr0, None, 1)]
            ):
                lr = u.value
    meta.finish()
    return lr


def test_rl_learns_to_raise_a_too_small_learning_rate():
    """A control problem: the lr starts 8x below the best one. Untrained, the greedy policy keeps
    it; after 40 episodes of local REINFORCE, the greedy policy raises it to within 2x of the best."""
    kwargs = {
        "update_frequency": 10,
        "wd_actions": None,
        "total_steps": 300,
        "batch_size": 32,
        "return_horizon": 10,
        "action_mode": "multiplicative",
    }
    untrained = RLMetaOptimizer(seed=1, frozen=True, greedy=True, **kwargs)
    assert synthetic_episode(untrained) == pytest.approx(0.0125)

    meta = RLMetaOptimizer(policy_lr=1e-2, seed=0, **kwargs)
    for _ in range(40):
        meta.reset()
        synthetic_episode(meta)
    assert meta.learner.updates >= 30
    trained = RLMetaOptimizer(seed=1, frozen=True, greedy=True, **kwargs)
    trained.learner.load_weights(meta.learner.weights())
    final_lr = synthetic_episode(trained)
    assert 0.05 <= final_lr <= 0.2, final_lr


def test_save_and_load_policy_round_trip(tmp_path):
    meta = RLMetaOptimizer(update_frequency=1, seed=3, policy_lr=1e-2, batch_size=4, return_horizon=1)
    run(make_wrapper(meta), 30)
    assert meta.learner.version > 0
    path = save_policy(tmp_path / "policy.pt", meta)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "ray_metaopt.policy" and raw["version"] == meta.learner.version
    loaded = load_policy(path)
    assert loaded["config"]["lr_actions"] == [0.5, 1.0, 2.0]

    frozen = RLMetaOptimizer(update_frequency=1, policy_path=path, frozen=True, greedy=True)
    w1, w2 = meta.learner.network.state_dict(), frozen.learner.network.state_dict()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert frozen.learner.version == meta.learner.version
    lrs, _ = run(make_wrapper(frozen), 20)
    assert frozen.learner.version == meta.learner.version and frozen.ready == [] and frozen.pending == []
    lrs_again, _ = run(
        make_wrapper(RLMetaOptimizer(update_frequency=1, policy_path=path, frozen=True, greedy=True)), 20
    )
    assert lrs == lrs_again  # greedy and frozen: deterministic whatever the seed

    learning = RLMetaOptimizer(
        update_frequency=1, policy_path=path, policy_lr=5e-3, batch_size=4, return_horizon=1
    )
    run(make_wrapper(learning), 20)
    assert learning.learner.version > meta.learner.version  # continues learning from the saved policy
    assert learning.learner.optimizer.param_groups[0]["lr"] == 5e-3


def test_policy_path_with_other_actions_is_an_error_and_from_policy_adopts_them(tmp_path):
    meta = RLMetaOptimizer(lr_actions=[0.8, 1.0, 1.25], wd_actions=None, hidden_size=8, seed=0)
    path = save_policy(str(tmp_path / "p.pt"), meta)
    with pytest.raises(ValueError, match="lr_actions=\\[0.8, 1.0, 1.25\\] \\(here \\[0.5, 1.0, 2.0\\]\\)"):
        RLMetaOptimizer(policy_path=path)
    adopted = RLMetaOptimizer.from_policy(path, frozen=True, update_frequency=3)
    assert adopted.config.lr_actions == (0.8, 1.0, 1.25) and adopted.config.wd_actions is None
    assert adopted.update_frequency == 3 and adopted.frozen


def test_load_policy_rejects_other_files(tmp_path):
    torch.save({"weights": {}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a ray_metaopt policy"):
        load_policy(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError):
        load_policy(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")  # a truncated or foreign file
    with pytest.raises(ValueError, match=r"junk.pt' is not a readable policy file \("):
        load_policy(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="is not a readable policy file"):
        RLMetaOptimizer(policy_path=str(tmp_path / "junk.pt"))


def test_state_dict_loads_with_weights_only_and_reset_keeps_the_policy():
    meta = RLMetaOptimizer(update_frequency=1, seed=0, policy_lr=1e-2, batch_size=2, return_horizon=1)
    run(make_wrapper(meta), 10)
    buffer = io.BytesIO()
    torch.save(meta.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert (
        state["type"] == "RLMetaOptimizer"
        and state["state"]["learner_state"]["version"] == meta.learner.version
    )
    version, draws = meta.learner.version, meta.draws
    meta.reset()
    assert meta.learner.version == version and meta.pending == [] and meta.features["loss0"] is None
    assert meta.draws == draws > 0  # a new episode draws new numbers


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_loop_with_tensor_metrics():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1).to(device)
    meta = RLMetaOptimizer(update_frequency=5, seed=0, batch_size=4, return_horizon=2)
    wrapper = OptimizerWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2), meta)
    x, y = torch.randn(64, 8, device=device), torch.randn(64, 1, device=device)
    for _ in range(100):
        loss = (model(x) - y).pow(2).mean()
        wrapper.zero_grad()
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        wrapper.update_hyperparameters({"loss": loss.detach(), "grad_norm": gn})
        wrapper.step()
    assert meta.counters["decisions"] == 20 and meta.learner.updates >= 3
    assert next(meta.learner.network.parameters()).device.type == "cpu"
    assert math.isfinite(wrapper.param_groups[0]["lr"])
