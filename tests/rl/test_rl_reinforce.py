"""REINFORCE: it learns a bandit where one action is clearly best; baseline, staleness weights, guards."""

from __future__ import annotations

import io
import math

import pytest
import torch

from ray_metaopt.rl.policy import PolicyConfig
from ray_metaopt.rl.reinforce import Learner, compute_baseline, invalid_transition, phase_bucket, update_ema


def transition(cfg, *, lr=1, wd=1, ret=0.0, logp=-0.5, version=0, rows=1, progress=None, decision=0):
    return {
        "rows": [[0.1] * cfg.state_dim for _ in range(rows)],
        "lr": [lr] * rows,
        "wd": [wd] * rows,
        "logp": logp,
        "ret": ret,
        "progress": progress,
        "decision": decision,
        "version": version,
    }


def sample_batch(learner, gen, n):
    """States, sampled actions and their log-probs under the learner's current policy."""
    cfg = learner.config
    states = (torch.randn(n, cfg.state_dim, generator=gen)).clamp(-3, 3)
    with torch.no_grad():
        lr_logits, wd_logits = learner.network(states)
    lr_logp = lr_logits.log_softmax(-1)
    wd_logp = wd_logits.log_softmax(-1)
    lr = torch.multinomial(lr_logp.exp(), 1, generator=gen).squeeze(1)
    wd = torch.multinomial(wd_logp.exp(), 1, generator=gen).squeeze(1)
    logp = lr_logp.gather(1, lr[:, None]).squeeze(1) + wd_logp.gather(1, wd[:, None]).squeeze(1)
    return states, lr, wd, logp


def mean_probs(learner, gen):
    states = torch.randn(256, learner.config.state_dim, generator=gen).clamp(-3, 3)
    with torch.no_grad():
        lr_logits, wd_logits = learner.network(states)
    return lr_logits.softmax(-1).mean(0), wd_logits.softmax(-1).mean(0)


def test_reinforce_learns_the_clearly_best_actions_of_a_bandit():
    """Reward +1 for lr action x2 and +0.5 for the wd action -1e-5, plus noise. The initial policy
    prefers "keep" (p=0.8); within 120 updates of 32 it must prefer the best actions."""
    cfg = PolicyConfig(policy_lr=1e-2, batch_size=32, seed=0)
    learner = Learner(cfg)
    gen = torch.Generator().manual_seed(0)
    lr_p0, wd_p0 = mean_probs(learner, gen)
    assert lr_p0[2] < 0.15 and wd_p0[0] < 0.15
    for _ in range(120):
        states, lr, wd, logp = sample_batch(learner, gen, cfg.batch_size)
        reward = (
            (lr == 2).float() + 0.5 * (wd == 0).float() + 0.3 * torch.randn(cfg.batch_size, generator=gen)
        )
        batch = [
            {
                "rows": [s.tolist()],
                "lr": [int(a)],
                "wd": [int(b)],
                "logp": float(p),
                "ret": float(r),
                "progress": None,
                "decision": 0,
                "version": learner.version,
            }
            for s, a, b, p, r in zip(states, lr, wd, logp, reward)
        ]
        metrics = learner.update(batch)
        assert math.isfinite(metrics["policy/pg_loss"])
    lr_p, wd_p = mean_probs(learner, gen)
    assert lr_p[2] > 0.9, lr_p
    assert wd_p[0] > 0.8, wd_p
    assert learner.version == learner.updates == 120


def test_entropy_bonus_keeps_the_policy_from_collapsing():
    """With rewards that do not depend on the action, only the entropy bonus acts: it must raise entropy."""
    cfg = PolicyConfig(policy_lr=1e-2, batch_size=32, entropy_weight=1.0, seed=0)
    learner = Learner(cfg)
    gen = torch.Generator().manual_seed(1)
    before = None
    for _ in range(30):
        states, lr, wd, logp = sample_batch(learner, gen, cfg.batch_size)
        batch = [
            {
                "rows": [s.tolist()],
                "lr": [int(a)],
                "wd": [int(b)],
                "logp": float(p),
                "ret": 0.0,
                "progress": None,
                "decision": 0,
                "version": learner.version,
            }
            for s, a, b, p in zip(states, lr, wd, logp)
        ]
        m = learner.update(batch)
        before = m["policy/entropy"] if before is None else before
    assert m["policy/entropy"] > before + 0.3
    assert m["policy/entropy"] <= 2 * math.log(3) + 1e-6


@pytest.mark.parametrize(
    ("returns", "buckets", "ema", "population", "expected"),
    [
        # population: leave-one-out mean of the same bucket; a lone bucket falls back to the batch
        ([1.0, 2.0, 3.0, 10.0], ["a", "a", "a", "b"], {}, True, [2.5, 2.0, 1.5, 2.0]),
        # ... or to that bucket's moving average when there is one
        ([1.0, 2.0, 3.0, 10.0], ["a", "a", "a", "b"], {"b": 7.0}, True, [2.5, 2.0, 1.5, 7.0]),
        # moving average (local): the bucket's EMA, else the leave-one-out batch mean
        ([1.0, 2.0, 3.0, 10.0], ["a", "a", "a", "b"], {"a": 1.0}, False, [1.0, 1.0, 1.0, 2.0]),
        ([4.0], ["a"], {}, True, [0.0]),
    ],
)
def test_baseline(returns, buckets, ema, population, expected):
    assert compute_baseline(returns, buckets, ema, population=population) == pytest.approx(expected)


def test_baseline_moving_average():
    ema = {}
    update_ema(ema, [1.0, 3.0, 5.0], ["a", "a", "b"], decay=0.9)
    assert ema == {"a": 2.0, "b": 5.0}
    update_ema(ema, [12.0], ["a"], decay=0.9)
    assert ema["a"] == pytest.approx(0.9 * 2.0 + 0.1 * 12.0)


@pytest.mark.parametrize(
    ("progress", "decision", "buckets", "expected"),
    [
        (0.0, 0, 10, "p0"),
        (0.55, 0, 10, "p5"),
        (1.0, 0, 10, "p9"),
        (None, 0, 10, "d0"),
        (None, 6, 10, "d2"),
        (None, 10**9, 10, "d9"),
        (0.5, 3, 1, "all"),
    ],
)
def test_phase_bucket(progress, decision, buckets, expected):
    assert phase_bucket(progress, decision, buckets) == expected


def test_invalid_transitions_are_recognised():
    cfg = PolicyConfig()
    good = transition(cfg)
    assert invalid_transition(good, cfg) is None
    assert invalid_transition(transition(cfg, wd=-1), cfg) is None  # group without weight decay
    bad = {
        "non-finite return": dict(good, ret=math.nan),
        "infinite return": dict(good, ret=math.inf),
        "non-finite logp": dict(good, logp=-math.inf),
        "nan feature": dict(good, rows=[[math.nan] * cfg.state_dim]),
        "short row": dict(good, rows=[[0.0] * 3]),
        "lr out of range": dict(good, lr=[3]),
        "wd out of range": dict(good, wd=[3]),
        "missing key": {k: v for k, v in good.items() if k != "ret"},
        "not a dict": [1, 2, 3],
        "empty rows": dict(good, rows=[], lr=[], wd=[]),
    }
    for name, t in bad.items():
        assert invalid_transition(t, cfg) is not None, name


def test_importance_weights_of_stale_transitions_are_clipped():
    cfg = PolicyConfig(policy_lr=1e-3, batch_size=4)
    learner = Learner(cfg, importance_clip=2.0)
    # The acting policy gave these actions probability e^-20: the ratio would be ~e^18.
    batch = [transition(cfg, lr=i % 3, ret=float(i), logp=-20.0) for i in range(4)]
    m = learner.update(batch)
    assert m["policy/importance_weight"] == pytest.approx(2.0)


def test_non_finite_update_is_skipped_and_counted():
    cfg = PolicyConfig(batch_size=2)
    learner = Learner(cfg)
    with torch.no_grad():
        learner.network.lr_head.weight[0, 0] = math.inf
    before = {k: v.clone() for k, v in learner.network.state_dict().items()}
    m = learner.update([transition(cfg, ret=1.0), transition(cfg, ret=-1.0)])
    assert m == {"policy/version": 0, "policy/skipped_updates": 1}
    assert learner.version == 0 and learner.skipped_updates == 1
    after = learner.network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_learner_state_round_trip_with_weights_only_continues_identically():
    cfg = PolicyConfig(policy_lr=1e-2, batch_size=4, seed=2)
    a = Learner(cfg)
    batches = [[transition(cfg, lr=(i + j) % 3, ret=float(j - i)) for j in range(4)] for i in range(4)]
    a.update(batches[0])
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    b = Learner(PolicyConfig(policy_lr=1e-2, batch_size=4, seed=99))
    b.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    for batch in batches[1:]:
        assert a.update(batch) == b.update(batch)
    sa, sb = a.network.state_dict(), b.network.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _bandit_batch(learner, gen, n, offset_weight):
    """A bandit whose returns carry a large state-dependent offset (what a trial's initial lr
    does to its returns) besides a small gain for lr action x2."""
    states, lr, wd, logp = sample_batch(learner, gen, n)
    ret = offset_weight * states[:, 0] + 0.5 * (lr == 2).float() + 0.1 * torch.randn(n, generator=gen)
    return [
        {"rows": [s.tolist()], "lr": [int(a)], "wd": [int(b)], "logp": float(p), "ret": float(r),
         "progress": None, "decision": 0, "version": learner.version}
        for s, a, b, p, r in zip(states, lr, wd, logp, ret)
    ]


def test_value_baseline_sees_through_a_state_dependent_offset():
    """Same bandit, same seeds: the learned V(state) removes the offset from the advantages and
    finds the better action in 80 updates; the average baseline is still mostly noise."""
    probs = {}
    for baseline in ("value", "average"):
        learner = Learner(PolicyConfig(policy_lr=1e-2, batch_size=32, seed=0, baseline=baseline))
        gen = torch.Generator().manual_seed(3)
        losses = [learner.update(_bandit_batch(learner, gen, 32, offset_weight=3.0)).get("policy/value_loss") for _ in range(80)]
        probs[baseline] = mean_probs(learner, torch.Generator().manual_seed(9))[0][2].item()
        if baseline == "value":  # V fits the offset (its variance is ~8 at the start)
            assert sum(losses[-10:]) / 10 < 0.1 * sum(losses[:3]) / 3
        else:
            assert losses[-1] is None
    assert probs["value"] > 0.85 and probs["average"] < 0.6, probs


def test_value_baseline_state_round_trips_and_unknown_baselines_are_refused():
    cfg = PolicyConfig(batch_size=8, seed=1, baseline="value")
    learner = Learner(cfg)
    gen = torch.Generator().manual_seed(0)
    learner.update(_bandit_batch(learner, gen, 8, offset_weight=1.0))
    state = learner.state_dict()
    assert "value_weights" in state and "value_optimizer" in state
    other = Learner(cfg)
    other.load_state_dict(state)
    states = torch.randn(4, cfg.state_dim, generator=gen)
    assert torch.equal(other.value(states), learner.value(states))
    assert "value_weights" not in Learner(PolicyConfig(wd_actions=None)).state_dict()
    with pytest.raises(ValueError, match="baseline.*'median'"):
        PolicyConfig(baseline="median")
