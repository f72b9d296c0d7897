"""The benchmark's baseline/control strategies, through the real OptimizerWrapper."""

from __future__ import annotations

import io

import pytest
import torch

from ray_metaopt import OptimizerWrapper
from ray_metaopt.bench.strategies import LRReplay, StateBlindRLMetaOptimizer, TorchReduceLROnPlateau
from ray_metaopt.tune import build_meta_optimizer


def _wrapper(meta, lr=1.0, groups=1):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    opt = torch.optim.SGD([{"params": [p], "lr": lr * (i + 1)} for i, p in enumerate(params)])
    return OptimizerWrapper(opt, meta), params


def _step(wrapper, params, metrics, step):
    for p in params:
        p.grad = torch.ones_like(p)
    wrapper.step()
    wrapper.update_hyperparameters(metrics, step=step)


# val_loss at each decision; torch's rule (patience 2, factor 0.1, rel threshold 1e-4, cooldown 1):
# 1.0 best | 1.0 bad 1 | 1.0 bad 2 | 1.0 bad 3 > 2 -> cut, cooldown | 0.5 best | 0.6 bad 1 (cooldown
# over) | 0.6 bad 2 | 0.6 bad 3 -> cut
VAL_LOSSES = [1.0, 1.0, 1.0, 1.0, 0.5, 0.6, 0.6, 0.6]
EXPECTED_LR = [1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.01]


def test_torch_reduce_lr_on_plateau_cuts_like_torch_itself():
    meta = TorchReduceLROnPlateau(update_frequency=1, patience=2, cooldown=1)
    wrapper, params = _wrapper(meta)
    reference_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(reference_opt, patience=2, cooldown=1)
    got, expected_torch = [], []
    for step, val in enumerate(VAL_LOSSES):
        _step(wrapper, params, {"loss": 1.0, "val_loss": val}, step)
        reference.step(val)
        got.append(wrapper.param_groups[0]["lr"])
        expected_torch.append(reference_opt.param_groups[0]["lr"])
    assert got == pytest.approx(EXPECTED_LR)
    assert got == pytest.approx(expected_torch)
    assert [d.step for d in wrapper.log.decisions(hparam="lr")] == [3, 7]


def test_torch_reduce_lr_on_plateau_cuts_every_group_and_skips_without_the_metric():
    meta = TorchReduceLROnPlateau(update_frequency=1, patience=0)
    wrapper, params = _wrapper(meta, lr=1.0, groups=2)
    _step(wrapper, params, {"loss": 1.0}, 0)  # no val_loss: no decision, no state change
    assert meta.torch_state is None
    _step(wrapper, params, {"loss": 1.0, "val_loss": 1.0}, 1)
    _step(wrapper, params, {"loss": 1.0, "val_loss": 1.0}, 2)
    assert [g["lr"] for g in wrapper.param_groups] == pytest.approx([0.1, 0.2])


def test_torch_reduce_lr_on_plateau_resumes_bit_for_bit_from_a_weights_only_state_dict():
    def run(resume_at=None):
        meta = TorchReduceLROnPlateau(update_frequency=1, patience=1)
        wrapper, params = _wrapper(meta)
        lrs = []
        for step, val in enumerate(VAL_LOSSES):
            if step == resume_at:
                buffer = io.BytesIO()
                torch.save(wrapper.state_dict(), buffer)
                buffer.seek(0)
                state = torch.load(buffer, weights_only=True)
                meta = TorchReduceLROnPlateau(update_frequency=1, patience=1)
                fresh, _ = _wrapper(meta)
                fresh.optimizer.param_groups[0]["params"] = wrapper.optimizer.param_groups[0]["params"]
                fresh.load_state_dict(state)
                wrapper = fresh
            _step(wrapper, params, {"loss": 1.0, "val_loss": val}, step)
            lrs.append(wrapper.param_groups[0]["lr"])
        return lrs

    assert run(resume_at=3) == run()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"factor": 1.0}, r"factor must be in \(0, 1\), got factor=1.0"),
        ({"patience": -1}, "patience must be >= 0, got patience=-1"),
        ({"mode": "up"}, "mode must be one of"),
        ({"monitor": ""}, "monitor must be a metric name"),
    ],
)
def test_torch_reduce_lr_on_plateau_validates(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        TorchReduceLROnPlateau(**kwargs)


def test_torch_reduce_lr_on_plateau_builds_from_the_trainables_module_path():
    meta = build_meta_optimizer(
        "ray_metaopt.bench.strategies:TorchReduceLROnPlateau", {"patience": 2}, defaults={"update_frequency": 20}
    )
    assert isinstance(meta, TorchReduceLROnPlateau) and meta.update_frequency == 20 and meta.patience == 2


# schedule [[from_step, factor]]: completed steps 1..8 with decisions every 2 steps (after 2, 4, 6, 8)
@pytest.mark.parametrize(
    "schedule, expected",
    [
        # lr after each step; a decision after n completed steps applies the factor in force at n
        ([[2, 0.5], [6, 0.25]], [1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]),
        ([[3, 2.0]], [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0]),  # change at 3: first applied at the decision after 4
        ([], [1.0] * 8),
    ],
)
def test_lr_replay_sets_each_group_to_factor_times_its_initial_lr(schedule, expected):
    wrapper, params = _wrapper(LRReplay(schedule, update_frequency=2), lr=1.0, groups=2)
    got0, got1 = [], []
    for step in range(8):
        _step(wrapper, params, {"loss": 1.0}, step)
        got0.append(wrapper.param_groups[0]["lr"])
        got1.append(wrapper.param_groups[1]["lr"])
    assert got0 == pytest.approx(expected)
    assert got1 == pytest.approx([2.0 * x for x in expected])  # group 1 started at lr 2


def test_lr_replay_multiplies_an_attached_schedule_and_resumes_from_its_state():
    """On a cosine schedule the factor multiplies the schedule's value, as the RL arm's multiplier did."""
    total = 8
    replay = LRReplay([[2, 2.0], [6, 0.5]], update_frequency=2)
    wrapper, params = _wrapper(replay, lr=1.0)
    scheduler = wrapper.attach_scheduler(torch.optim.lr_scheduler.CosineAnnealingLR(wrapper, T_max=total))
    reference_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(reference_opt, T_max=total)
    got, expected = [], []
    for step in range(total):
        _step(wrapper, params, {"loss": 1.0}, step)
        factor = replay.factor_at(step + 1 - (step + 1) % 2)
        if step == 3:  # a resume mid-run decides like the uninterrupted run
            state = replay.state_dict()
            assert state["state"] == {"applied": [2.0]}
            resumed = LRReplay([[2, 2.0], [6, 0.5]], update_frequency=2)
            resumed.load_state_dict(state)
            assert resumed.applied == replay.applied
        got.append(wrapper.param_groups[0]["lr"])
        expected.append(reference_opt.param_groups[0]["lr"] * factor)
        scheduler.step()
        reference_opt.step()
        reference.step()
    assert got == pytest.approx(expected)


def test_lr_replay_reproduces_a_recorded_trajectory():
    """Record a strategy's group-0 lr changes as [from_step, factor], replay them, compare per step."""
    meta = TorchReduceLROnPlateau(update_frequency=1, patience=0, factor=0.5)
    wrapper, params = _wrapper(meta, lr=0.1)
    recorded = []
    for step, val in enumerate([1.0, 1.0, 0.5, 0.5, 0.5, 0.4]):
        _step(wrapper, params, {"loss": 1.0, "val_loss": val}, step)
        recorded.append(wrapper.param_groups[0]["lr"])
    schedule = [[d.step + 1, d.new / 0.1] for d in wrapper.log.decisions(hparam="lr")]
    replay, params = _wrapper(LRReplay(schedule, update_frequency=1), lr=0.1)
    replayed = []
    for step in range(6):
        _step(replay, params, {"loss": 1.0}, step)
        replayed.append(replay.param_groups[0]["lr"])
    assert replayed == pytest.approx(recorded)


@pytest.mark.parametrize(
    "schedule, error, message",
    [
        ("fast", TypeError, "schedule must be a list"),
        ([[1, 0.5, 3]], TypeError, r"schedule\[0\] must be a \[from_step, factor\] pair"),
        ([[1, 0.0]], ValueError, r"schedule\[0\]\[1\] must be in \(0, inf\)"),
        ([[1, float("inf")]], ValueError, r"schedule\[0\]\[1\] must be in \(0, inf\)"),
        ([[4, 0.5], [4, 0.25]], ValueError, "schedule steps must increase"),
        ([[-1, 0.5]], ValueError, r"schedule\[0\]\[0\] must be >= 0"),
    ],
)
def test_lr_replay_validates(schedule, error, message):
    with pytest.raises(error, match=message):
        LRReplay(schedule)


def _losses(kind, n=12):
    if kind == "falling":
        return [1.0 / (1 + i) for i in range(n)]
    return [1.0 + 0.5 * (i % 3) for i in range(n)]  # noisy and flat


def _blind_rows(kind):
    meta = StateBlindRLMetaOptimizer(
        update_frequency=1, lr_actions=[0.5, 1.0, 2.0], wd_actions=None, seed=3, total_steps=100, batch_size=1000,
        breaker_factor=None,  # the noisy flat loss would trip the breaker and skip actions
    )
    wrapper, params = _wrapper(meta, lr=0.01)
    for step, loss in enumerate(_losses(kind)):
        _step(wrapper, params, {"loss": loss, "grad_norm": 1.0 + step}, step)
    return meta


def test_state_blind_policy_sees_only_zeros_and_acts_the_same_whatever_the_losses():
    falling, flat = _blind_rows("falling"), _blind_rows("flat")
    rows = [row for t in falling.pending + falling.ready for row in t["rows"]]
    assert rows and all(x == 0.0 for row in rows for x in row)
    # Same seed, same (zero) inputs: the same sampled actions although the losses differ.
    actions = lambda m: [t["lr"] for t in m.ready + m.pending]
    assert actions(falling) == actions(flat)
    # The real features were computed (rewards need them): the blind policy only hides them.
    assert falling.features["step"] is not None


def test_the_state_does_reach_an_ordinary_rl_policy():
    """Control of the control: the same setup without blinding feeds non-zero rows."""
    from ray_metaopt.rl import RLMetaOptimizer

    meta = RLMetaOptimizer(update_frequency=1, lr_actions=[0.5, 1.0, 2.0], wd_actions=None, seed=3, total_steps=100,
                           batch_size=1000)
    wrapper, params = _wrapper(meta, lr=0.01)
    for step, loss in enumerate(_losses("falling")):
        _step(wrapper, params, {"loss": loss, "grad_norm": 1.0 + step}, step)
    rows = [row for t in meta.pending + meta.ready for row in t["rows"]]
    assert any(x != 0.0 for row in rows for x in row)
