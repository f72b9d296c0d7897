"""PolicyConfig validation, the network's initial distribution, deterministic sampling."""

from __future__ import annotations

import math

import pytest
import torch

from ray_metaopt.rl.policy import (
    PolicyConfig,
    PolicyNetwork,
    argmax,
    sample_index,
    uniform,
)


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragment"),
    [
        ({"lr_actions": []}, ValueError, "lr_actions must hold at least one action"),
        ({"lr_actions": [0.5, -1.0]}, ValueError, r"lr_actions\[1\]=-1.0"),
        ({"lr_actions": [0.5, 0.0]}, ValueError, "positive"),
        ({"lr_actions": [1.0, 1.0]}, ValueError, "repeat"),
        ({"lr_actions": "0.5"}, TypeError, "lr_actions must be a list"),
        ({"lr_actions": [0.5, math.inf]}, ValueError, r"lr_actions\[1\] must be finite"),
        ({"wd_actions": []}, ValueError, "wd_actions must hold at least one action"),
        ({"wd_actions": [math.nan]}, ValueError, "NaN"),
        ({"policy_lr": -1e-4}, ValueError, "policy_lr"),
        ({"policy_lr": 0.0}, ValueError, "policy_lr"),
        ({"entropy_weight": -0.01}, ValueError, "entropy_weight"),
        ({"action_mode": "additive"}, ValueError, "action_mode"),
        ({"hidden_size": 0}, ValueError, "hidden_size"),
        ({"initial_keep_prob": 1.0}, ValueError, "initial_keep_prob"),
        ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"gamma": 1.5}, ValueError, "gamma"),
        ({"return_horizon": 0}, ValueError, "return_horizon"),
        ({"normalize_advantages": "yes"}, TypeError, "normalize_advantages"),
        ({"baseline_decay": 1.0}, ValueError, "baseline_decay"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
    ],
)
def test_bad_config_is_rejected_with_the_argument_named(kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        PolicyConfig(**kwargs)


def test_from_dict_rejects_unknown_keys_and_round_trips():
    with pytest.raises(ValueError, match="unknown keys \\['lr'\\]"):
        PolicyConfig.from_dict({"lr": 1.0})
    cfg = PolicyConfig(lr_actions=[0.8, 1.0, 1.25], wd_actions=None, hidden_size=8, seed=3)
    assert PolicyConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.num_wd_actions == 0 and cfg.keep_wd_index is None and cfg.keep_lr_index == 1


def test_require_compatible_names_the_differing_keys():
    a = PolicyConfig()
    b = PolicyConfig(lr_actions=[0.5, 1.0], hidden_size=16, policy_lr=1.0)
    with pytest.raises(
        ValueError,
        match=r"^the file has hidden_size=16 \(here 32\), lr_actions=\[0.5, 1.0\] \(here \[0.5, 1.0, 2.0\]\); fix it$",
    ):
        a.require_compatible(b, "the file has", "fix it")
    a.require_compatible(PolicyConfig(policy_lr=1.0, seed=5).signature(), "x", "y")  # learner-only fields may differ


@pytest.mark.parametrize(
    ("lr_actions", "wd_actions", "keep_prob", "lr_expected", "wd_expected"),
    [
        ([0.5, 1.0, 2.0], [-1e-5, 0.0, 1e-5], 0.8, [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]),
        ([0.7, 1.0, 1.4, 2.0], [0.0, 1e-4], 0.7, [0.1, 0.7, 0.1, 0.1], [0.7, 0.3]),
        ([0.5, 2.0], None, None, [0.5, 0.5], None),
    ],
)
def test_initial_policy_is_the_keep_prior_whatever_the_state(
    lr_actions, wd_actions, keep_prob, lr_expected, wd_expected
):
    cfg = PolicyConfig(lr_actions=lr_actions, wd_actions=wd_actions, initial_keep_prob=keep_prob, seed=0)
    net = PolicyNetwork(cfg)
    states = torch.empty(64, cfg.state_dim).uniform_(-5, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lr_logits, wd_logits = net(states)
    torch.testing.assert_close(
        lr_logits.softmax(-1), torch.tensor([lr_expected]).expand(64, -1), atol=0.02, rtol=0
    )
    if wd_expected is None:
        assert wd_logits is None
    else:
        torch.testing.assert_close(
            wd_logits.softmax(-1), torch.tensor([wd_expected]).expand(64, -1), atol=0.02, rtol=0
        )


def test_acting_path_matches_forward_and_sees_in_place_updates():
    net = PolicyNetwork(PolicyConfig(seed=3))
    rows = torch.empty(3, net.config.state_dim).uniform_(-2, 2, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        lr_logp, wd_logp = net.act_log_probs(rows.tolist())
        with torch.no_grad():
            lr_logits, wd_logits = net(rows)
        assert torch.equal(torch.tensor(lr_logp), lr_logits.log_softmax(-1))
        assert torch.equal(torch.tensor(wd_logp), wd_logits.log_softmax(-1))
        with torch.no_grad():  # an optimizer step or load_state_dict writes in place
            net.lr_head.bias.add_(torch.tensor([1.0, -1.0, 0.5]))
            net.body[0].weight.mul_(1.5)


def test_initial_weights_depend_only_on_the_seed():
    a = PolicyNetwork(PolicyConfig(seed=7)).state_dict()
    b = PolicyNetwork(PolicyConfig(seed=7)).state_dict()
    c = PolicyNetwork(PolicyConfig(seed=8)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["body.0.weight"], c["body.0.weight"])


def test_uniform_is_deterministic_and_uniform():
    draws = [uniform(123, i) for i in range(20000)]
    assert draws[:5] == [uniform(123, i) for i in range(5)]
    assert draws[:5] != [uniform(124, i) for i in range(5)]
    assert all(0.0 <= u < 1.0 for u in draws)
    assert sum(draws) / len(draws) == pytest.approx(0.5, abs=0.01)
    deciles = [sum(1 for u in draws if k / 10 <= u < (k + 1) / 10) for k in range(10)]
    assert min(deciles) > 1800 and max(deciles) < 2200


@pytest.mark.parametrize(("u", "expected"), [(0.0, 0), (0.19, 0), (0.2, 1), (0.69, 1), (0.7, 2), (0.9999, 2)])
def test_sample_index_is_the_inverse_cdf(u, expected):
    assert sample_index([0.2, 0.5, 0.3], u) == expected


def test_argmax():
    assert argmax([-3.0, -0.1, -2.0]) == 1
