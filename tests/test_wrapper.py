"""OptimizerWrapper: pass-through, applying, composition with torch schedulers, checkpoints."""

from __future__ import annotations

import io
import math

import pytest
import torch

from core_strategies import LossTracker, ScaleEvery, train_step, two_group_model
from ray_metaopt import HParamUpdate, MetaOptimizer, OptimizerWrapper


def make(meta=None, opt_cls=torch.optim.AdamW, **opt_kwargs):
    model, groups = two_group_model()
    opt = opt_cls(groups, **opt_kwargs)
    return model, OptimizerWrapper(opt, meta or ScaleEvery(update_frequency=2))


def data(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)


# ------------------------------------------------------------------ pass-through
def test_is_an_optimizer_and_passes_through():
    model, w = make()
    assert isinstance(w, torch.optim.Optimizer)
    assert w.param_groups is w.optimizer.param_groups
    assert w.state is w.optimizer.state
    assert w.defaults is w.optimizer.defaults
    x, y = data()
    train_step(model, w, x, y)
    assert len(w.state) > 0  # AdamW state created through the wrapper
    w.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_add_param_group_records_initial_values():
    model, w = make()
    extra = torch.nn.Parameter(torch.zeros(3))
    w.add_param_group({"params": [extra], "lr": 0.5, "name": "extra"})
    states = w.group_states()
    assert [s.name for s in states] == ["body", "head", "extra"]
    assert states[2].initial_lr == 0.5 and states[2].num_params == 3


def test_step_hooks_registered_on_wrapper_run():
    model, w = make()
    calls = []
    w.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    w.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    x, y = data()
    train_step(model, w, x, y)
    assert calls == ["pre", "post"]


def test_global_step_hooks_fire_once_per_step():
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    model, w = make()
    seen = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(type(opt).__name__))
    try:
        x, y = data()
        train_step(model, w, x, y)
    finally:
        handle.remove()
    assert seen == ["OptimizerWrapper"]  # once, with the wrapper (torch passes the optimizer stepped)


def test_lbfgs_closure_passes_through():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    w = OptimizerWrapper(torch.optim.LBFGS(model.parameters(), lr=0.5), ScaleEvery(update_frequency=100))
    x, y = data()

    def closure():
        w.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = closure().item()
    for _ in range(5):
        loss = w.step(closure)
    assert loss.item() < first


def test_grad_scaler_unscale_and_step():
    model, w = make()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    x, y = data()
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        w.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(w)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        w.update_hyperparameters({"loss": loss.detach(), "grad_norm": grad_norm})
        scaler.step(w)
        scaler.update()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert w.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5)  # one decision at step 1


def test_grad_scaler_inf_grad_norm_skips_decision():
    model, w = make(ScaleEvery(update_frequency=1))
    w.update_hyperparameters({"loss": 1.0, "grad_norm": torch.tensor(float("inf"))})
    assert [g["lr"] for g in w.param_groups] == [1e-2, 1e-3]
    assert w.log.num_skipped == 1 and "grad_norm=inf" in w.log.skipped[0].reason


# ------------------------------------------------------------------ deciding and applying
def test_decisions_apply_to_every_group_at_frequency():
    model, w = make(ScaleEvery(update_frequency=3))
    x, y = data()
    lrs = []
    for _ in range(7):
        train_step(model, w, x, y)
        lrs.append([g["lr"] for g in w.param_groups])
    # decisions at steps 2 and 5 (0-based): after 3 and 6 reports
    assert lrs == [
        [1e-2, 1e-3],
        [1e-2, 1e-3],
        [5e-3, 5e-4],
        [5e-3, 5e-4],
        [5e-3, 5e-4],
        [2.5e-3, 2.5e-4],
        [2.5e-3, 2.5e-4],
    ]
    recorded = w.log.decisions(hparam="lr", group=1)
    assert [(d.step, d.name, d.old, d.new) for d in recorded] == [(2, "head", 1e-3, 5e-4), (5, "head", 5e-4, 2.5e-4)]
    assert all(d.reason == "scale x0.5" for d in recorded)


def test_explicit_steps_and_internal_counter():
    model, w = make(ScaleEvery(update_frequency=10))
    assert w.update_hyperparameters({"loss": 1.0}, step=3) == []
    assert w.step_count == 4
    assert len(w.update_hyperparameters({"loss": 1.0}, step=9)) == 2
    assert w.step_count == 10
    with pytest.raises(TypeError, match="step must be a non-negative int"):
        w.update_hyperparameters({"loss": 1.0}, step=-1)


@pytest.mark.parametrize(
    "bounds, expected",
    [
        ({"min_lr": 4e-3}, [4e-3, 4e-3]),
        ({"min_lr": [4e-3, 1e-4]}, [4e-3, 1.25e-4]),
        ({"min_lr": {"head": 3e-4}}, [1.25e-3, 3e-4]),
        ({"min_lr": {"default": 2e-3, "head": 1e-6}}, [2e-3, 1.25e-4]),
    ],
)
def test_per_group_lr_floor(bounds, expected):
    model, w = make(ScaleEvery(update_frequency=1, **bounds))
    for _ in range(3):
        w.update_hyperparameters({"loss": 1.0})
    assert [g["lr"] for g in w.param_groups] == pytest.approx(expected)


def test_max_lr_and_max_weight_decay():
    class Grow(MetaOptimizer):
        def decide(self, metrics, step, groups):
            return [HParamUpdate(g.index, "lr", g.lr * 10, "up") for g in groups] + [
                HParamUpdate(g.index, "weight_decay", g.weight_decay * 10 + 1, "up") for g in groups
            ]

    model, w = make(Grow(max_lr={"body": 0.05, "head": 0.002}, max_weight_decay=0.5))
    for _ in range(3):
        w.update_hyperparameters({"loss": 1.0})
    assert [g["lr"] for g in w.param_groups] == [0.05, 0.002]
    assert [g["weight_decay"] for g in w.param_groups] == [0.5, 0.5]


def test_per_group_spec_mismatch_and_unknown_names_raise():
    model, groups = two_group_model()
    with pytest.raises(ValueError, match=r"min_lr has 3 entries but the optimizer has 2 param groups"):
        OptimizerWrapper(torch.optim.SGD(groups, lr=0.1), ScaleEvery(min_lr=[0.0, 0.0, 0.0]))
    model, groups = two_group_model()
    with pytest.raises(ValueError, match=r"max_lr names unknown param groups \['tail'\]"):
        OptimizerWrapper(torch.optim.SGD(groups, lr=0.1), ScaleEvery(max_lr={"tail": 1.0}))


def test_nan_metric_never_reaches_lr_and_is_logged():
    model, w = make(ScaleEvery(update_frequency=1))
    w.update_hyperparameters({"loss": float("nan")})
    w.update_hyperparameters({"loss": torch.tensor(float("-inf"))})
    assert [g["lr"] for g in w.param_groups] == [1e-2, 1e-3]
    assert [s.step for s in w.log.skipped] == [0, 1]
    assert w.meta_optimizer.calls == 0
    w.update_hyperparameters({"loss": 1.0})  # the next finite report decides
    assert w.meta_optimizer.calls == 1


def test_non_finite_or_invalid_proposals():
    class Bad(MetaOptimizer):
        def __init__(self, update):
            super().__init__()
            self.update = update

        def decide(self, metrics, step, groups):
            return [self.update]

    model, w = make(Bad(HParamUpdate(0, "lr", float("nan"), "bug")))
    assert w.update_hyperparameters({"loss": 1.0}) == []
    assert w.param_groups[0]["lr"] == 1e-2 and w.log.num_skipped == 1
    model, w = make(Bad(HParamUpdate(5, "lr", 0.1, "bug")))
    with pytest.raises(ValueError, match="param group 5"):
        w.update_hyperparameters({"loss": 1.0})
    model, w = make(Bad(HParamUpdate(0, "nesterov_momentum", 0.1, "bug")))
    with pytest.raises(ValueError, match="no such hyperparameter"):
        w.update_hyperparameters({"loss": 1.0})


def test_tensor_lr_is_updated_in_place():
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))
    w = OptimizerWrapper(opt, ScaleEvery(update_frequency=1))
    lr_tensor = w.param_groups[0]["lr"]
    w.update_hyperparameters({"loss": 1.0})
    assert w.param_groups[0]["lr"] is lr_tensor and lr_tensor.item() == pytest.approx(0.005)


@pytest.mark.parametrize(
    "metrics, error, match",
    [
        ([("loss", 1.0)], TypeError, "metrics must be a mapping"),
        ({1: 1.0}, TypeError, "metric names must be str"),
        ({"loss": "1.0"}, TypeError, "metric 'loss' must be a number"),
        ({"loss": True}, TypeError, "metric 'loss' must be a number"),
        ({"loss": torch.ones(2)}, TypeError, r"shape \(2,\)"),
    ],
)
def test_bad_metrics(metrics, error, match):
    model, w = make()
    with pytest.raises(error, match=match):
        w.update_hyperparameters(metrics)


def test_bad_constructor_arguments():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        OptimizerWrapper(model, ScaleEvery())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="meta_optimizer must be a MetaOptimizer"):
        OptimizerWrapper(opt, "plateau")
    with pytest.raises(ValueError, match="metric_reduction must be one of"):
        OptimizerWrapper(opt, ScaleEvery(), metric_reduction="median")
    w = OptimizerWrapper(opt, ScaleEvery())
    with pytest.raises(TypeError, match="already an OptimizerWrapper"):
        OptimizerWrapper(w, ScaleEvery())


def test_mean_reduction_averages_between_decisions():
    model, groups = two_group_model()
    w = OptimizerWrapper(torch.optim.SGD(groups, lr=0.1), ScaleEvery(update_frequency=4), metric_reduction="mean")
    for loss in [1.0, torch.tensor(2.0), 3.0, torch.tensor(6.0)]:
        w.update_hyperparameters({"loss": loss})
    assert w.meta_optimizer.seen == [3.0]


class _CountingTensor(torch.Tensor):
    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.tolist):
            cls.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensor_metrics_are_read_only_at_decision_steps():
    model, w = make(ScaleEvery(update_frequency=5))
    _CountingTensor.reads = 0
    for step in range(4):
        w.update_hyperparameters({"loss": torch.tensor(1.0).as_subclass(_CountingTensor)})
    assert _CountingTensor.reads == 0
    w.update_hyperparameters({"loss": torch.tensor(1.0).as_subclass(_CountingTensor)})
    assert _CountingTensor.reads == 1


# ------------------------------------------------------------------ composition with LR schedulers
def test_cosine_schedule_keeps_shape_after_a_cut():
    """Chainable schedule (CosineAnnealingLR): a cut by f scales the rest of the schedule by f."""
    model, groups = two_group_model()
    ref_model, ref_groups = two_group_model()
    w = OptimizerWrapper(torch.optim.SGD(groups, lr=0.1), ScaleEvery(update_frequency=1000))
    sched = w.attach_scheduler(torch.optim.lr_scheduler.CosineAnnealingLR(w, T_max=10))
    ref_opt = torch.optim.SGD(ref_groups, lr=0.1)
    ref_sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=10)
    for step in range(8):
        if step == 3:
            w.apply_updates([HParamUpdate(i, "lr", g["lr"] * 0.5, "cut") for i, g in enumerate(w.param_groups)], step)
        w.step(); sched.step(); ref_opt.step(); ref_sched.step()
        factor = 0.5 if step >= 3 else 1.0
        for g, rg in zip(w.param_groups, ref_opt.param_groups):
            assert g["lr"] == pytest.approx(rg["lr"] * factor, rel=1e-9)


@pytest.mark.parametrize("attach", [True, False])
def test_lambda_schedule_composition(attach):
    """Closed-form schedule (LambdaLR): cuts persist only when the scheduler is attached."""
    model, groups = two_group_model()
    w = OptimizerWrapper(torch.optim.SGD(groups, lr=0.1), ScaleEvery(update_frequency=1000))
    sched = torch.optim.lr_scheduler.LambdaLR(w, lambda e: 1.0 / (1 + e))
    if attach:
        w.attach_scheduler(sched)
    w.step(); sched.step()  # lr = base / 2
    w.apply_updates([HParamUpdate(0, "lr", w.param_groups[0]["lr"] * 0.1, "cut")], step=1)
    w.step(); sched.step()  # lr = base / 3 (x 0.1 when attached)
    expected = 1e-2 / 3 * (0.1 if attach else 1.0)
    assert w.param_groups[0]["lr"] == pytest.approx(expected)
    assert w.param_groups[1]["lr"] == pytest.approx(1e-3 / 3)


def test_attach_scheduler_rejects_foreign_scheduler():
    model, w = make()
    other = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="another optimizer"):
        w.attach_scheduler(torch.optim.lr_scheduler.StepLR(other, 2))


# ------------------------------------------------------------------ checkpoints
def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def run(steps, w, model, x, y, start=0):
    out = []
    for s in range(start, start + steps):
        xb, yb = x[s % 4 :: 4], y[s % 4 :: 4]
        loss, decisions = train_step(model, w, xb, yb)
        out.append((loss, [g["lr"] for g in w.param_groups], [d.to_dict() for d in decisions]))
    return out


@pytest.mark.parametrize("reduction", ["last", "mean"])
def test_resume_is_bit_exact(reduction):
    x, y = data(64)

    def fresh():
        model, groups = two_group_model()
        return model, OptimizerWrapper(
            torch.optim.AdamW(groups), LossTracker(update_frequency=3), metric_reduction=reduction
        )

    model, w = fresh()
    full = run(20, w, model, x, y)

    model, w = fresh()
    first = run(11, w, model, x, y)  # stops mid-interval
    ckpt = roundtrip({"model": model.state_dict(), "opt": w.state_dict()})
    model, w = fresh()
    model.load_state_dict(ckpt["model"])
    w.load_state_dict(ckpt["opt"])
    second = run(9, w, model, x, y, start=11)
    assert first + second == full
    assert w.log.num_decisions == len([d for *_, ds in full for d in ds])


def test_state_dict_holds_optimizer_and_meta_state():
    model, w = make(LossTracker(update_frequency=1))
    x, y = data()
    run(3, w, model, x, y)
    sd = roundtrip(w.state_dict())
    assert set(sd) >= {"state", "param_groups", "meta_optimizer", "meta_wrapper"}
    assert sd["meta_optimizer"]["type"] == "LossTracker"
    # a plain optimizer accepts the wrapper's state dict (extra keys ignored)
    model2, groups2 = two_group_model()
    plain = torch.optim.AdamW(groups2)
    plain.load_state_dict(sd)
    assert [g["lr"] for g in plain.param_groups] == [g["lr"] for g in w.param_groups]


def test_plain_optimizer_state_dict_loads_into_wrapper():
    model, groups = two_group_model()
    plain = torch.optim.AdamW(groups)
    model, w = make(LossTracker())
    w.load_state_dict(plain.state_dict())
    assert w.meta_optimizer.rises == 0


def test_load_state_of_other_strategy_raises():
    model, w = make(LossTracker())
    sd = w.state_dict()
    model, w2 = make(ScaleEvery())
    with pytest.raises(ValueError, match="state_dict is for 'LossTracker'"):
        w2.load_state_dict(sd)


def test_reset_forgets_learning_state():
    model, w = make(LossTracker(update_frequency=1))
    for loss in [1.0, 2.0, 3.0]:
        w.update_hyperparameters({"loss": loss})
    assert w.meta_optimizer.rises == 2
    w.meta_optimizer.reset()
    assert w.meta_optimizer.rises == 0 and w.meta_optimizer.last is None
    assert w.meta_optimizer.next_update_step == 0


def test_decision_log_is_bounded_but_counts_everything():
    model, groups = two_group_model()
    w = OptimizerWrapper(torch.optim.SGD(groups, lr=0.1), ScaleEvery(update_frequency=1), max_log_records=3)
    for _ in range(5):
        w.update_hyperparameters({"loss": 1.0})
    assert len(w.decisions) == 3 and w.log.num_decisions == 10
    assert math.isclose(w.decisions[-1].new, 1e-3 * 0.5**5)


def test_rescale_anchors_moves_initial_values_and_schedules():
    model, groups = two_group_model()
    w = OptimizerWrapper(torch.optim.SGD(groups, lr=0.1), ScaleEvery(update_frequency=1000))
    sched = w.attach_scheduler(torch.optim.lr_scheduler.LambdaLR(w, lambda e: 1.0))
    w.rescale_anchors(1, "lr", factor=2.0)
    w.rescale_anchors(1, "weight_decay", value=0.5)
    head = w.group_states()[1]
    assert (head.initial_lr, head.initial_weight_decay) == (2e-3, 0.5)
    assert sched.base_lrs == [1e-2, 2e-3] and w.param_groups[1]["initial_lr"] == 2e-3
    with pytest.raises(ValueError, match="exactly one of factor and value"):
        w.rescale_anchors(0, "lr")
    with pytest.raises(ValueError, match="hparam must be 'lr' or 'weight_decay'"):
        w.rescale_anchors(0, "momentum", factor=2.0)


# ------------------------------------------------------------------ schedule-free optimizers
def test_schedule_free_optimizer_modes_decisions_and_resume():
    # schedulefree's optimizers keep their own lr bookkeeping (warmup, lr_max, weight_sum) in the
    # param groups and switch the weights with train()/eval(); through the wrapper both must work,
    # every group's lr must follow the strategy, and a state dict must resume the run exactly.
    schedulefree = pytest.importorskip("schedulefree")  # in the test extra; skipped only outside it
    x, y = data()

    def build():
        model, groups = two_group_model()
        opt = schedulefree.AdamWScheduleFree(groups, warmup_steps=3)
        return model, OptimizerWrapper(opt, ScaleEvery(update_frequency=4))

    model, w = build()
    with pytest.raises(Exception, match="train mode"):
        train_step(model, w, x, y, 0)  # schedule-free refuses to step in eval mode: nothing hidden
    model, w = build()
    w.train()  # reaches the wrapped optimizer
    for step in range(8):
        train_step(model, w, x, y, step)
    assert [g["lr"] for g in w.param_groups] == [1e-2 * 0.25, 1e-3 * 0.25]  # decisions at 3 and 7
    w.eval()
    assert all(not g["train_mode"] for g in w.param_groups)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": w.state_dict()}, buffer)

    def finish(model, w):
        w.train()
        for step in range(8, 16):
            train_step(model, w, x, y, step)
        w.eval()
        return [p.detach().clone() for p in model.parameters()], [dict(g) for g in w.param_groups]

    expected_params, expected_groups = finish(model, w)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2, w2 = build()
    model2.load_state_dict(saved["model"])
    w2.load_state_dict(saved["opt"])
    params, groups = finish(model2, w2)
    assert all(torch.equal(a, b) for a, b in zip(params, expected_params))
    keys = ("lr", "k", "weight_sum", "lr_max", "train_mode")
    assert [{k: g[k] for k in keys} for g in groups] == [{k: g[k] for k in keys} for g in expected_groups]


# ---------------------------------------------------------------- issue 17
class Propose(MetaOptimizer):
    """Proposes a fixed lr for every group at every decision."""

    def __init__(self, value, **kwargs):
        super().__init__(**kwargs)
        self.value = value
        self.reset()

    def decide(self, metrics, step, groups):
        return [HParamUpdate(g.index, "lr", self.value, "fixed") for g in groups]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("proposal, bound", [(1e-7, "min"), (1.0, "max")])
def test_tensor_lr_stored_value_stays_within_bounds(dtype, proposal, bound):
    # Clamping happened in float64 and fill_ rounded it: a float32 lr ended at 9.9999997e-05 < min_lr=1e-4.
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=torch.tensor(1e-3, dtype=dtype))
    w = OptimizerWrapper(opt, Propose(proposal, min_lr=1e-4, max_lr=0.3))
    (decision,) = w.update_hyperparameters({"loss": 1.0})
    stored = float(opt.param_groups[0]["lr"].item())
    assert 1e-4 <= stored <= 0.3
    assert decision.new == stored
    assert stored == pytest.approx(1e-4 if bound == "min" else 0.3, rel=1e-2)


def test_proposal_that_overflows_a_tensor_lr_is_never_written():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=torch.tensor(1e-3, dtype=torch.float16))
    w = OptimizerWrapper(opt, Propose(1e6))  # finite, but inf in float16; max_lr unbounded
    assert w.update_hyperparameters({"loss": 1.0}) == []
    stored = float(opt.param_groups[0]["lr"])
    assert math.isfinite(stored) and stored == pytest.approx(1e-3, rel=1e-2)
    assert "no finite value" in w.log.skipped[-1].reason


def test_rejected_metric_leaves_the_wrapper_working():
    # 10**400 raised OverflowError without the key, and every later call raised it too.
    model, w = make(ScaleEvery(update_frequency=2))
    w.update_hyperparameters({"loss": 1.0})
    for bad in ({"loss": 1.0, "tokens": 10**400}, {"loss": torch.tensor(1j)}, {"loss": "x"}):
        with pytest.raises((TypeError, ValueError), match="'tokens'|'loss'"):
            w.update_hyperparameters(bad)
        assert w.step_count == 1
    assert len(w.update_hyperparameters({"loss": 2.0})) == 2
    assert w.step_count == 2


def test_missing_monitor_metric_is_a_value_error_and_changes_nothing():
    class NeedsVal(ScaleEvery):
        def decide(self, metrics, step, groups):
            metrics["val_loss"]
            return super().decide(metrics, step, groups)

    model, w = make(NeedsVal(update_frequency=2))
    w.update_hyperparameters({"loss": 1.0})
    before = (w.state_dict()["meta_optimizer"], w.step_count, [g["lr"] for g in w.param_groups])
    with pytest.raises(ValueError, match=r"'val_loss' is missing"):
        w.update_hyperparameters({"loss": 1.0})
    assert (w.state_dict()["meta_optimizer"], w.step_count, [g["lr"] for g in w.param_groups]) == before
    assert len(w.update_hyperparameters({"loss": 1.0, "val_loss": 1.0})) == 2


def test_a_decision_is_atomic_when_applying_fails():
    class HalfBad(ScaleEvery):
        def decide(self, metrics, step, groups):
            good = super().decide(metrics, step, groups)
            return good + [HParamUpdate(7, "lr", 0.1, "bad group")]

    model, w = make(HalfBad(update_frequency=1))
    lrs = [g["lr"] for g in w.param_groups]
    meta_before = w.meta_optimizer.state_dict()
    with pytest.raises(ValueError, match="param group 7"):
        w.update_hyperparameters({"loss": 1.0})
    assert [g["lr"] for g in w.param_groups] == lrs  # group 0 and 1 were not written either
    assert w.meta_optimizer.state_dict() == meta_before
    assert len(w.log) == 0 and w.step_count == 0


def test_extreme_finite_losses_with_adaptive_frequency_never_raise():
    from ray_metaopt import AdaptiveFrequency

    model, w = make(LossTracker(adaptive_frequency=AdaptiveFrequency(max_interval=4)))
    for step, loss in enumerate([1e300, 1e-300, 1e300, 5e-324, 1.7e308, 0.0, -1.0]):
        if w.meta_optimizer.should_update(step):
            w.update_hyperparameters({"loss": loss}, step)
    assert w.meta_optimizer.rises >= 2


def test_mean_reduction_averages_only_since_the_previous_decision():
    # Dropping the accumulator's clear after a decision (so the next decision averages over two
    # intervals) failed no wrapper test.
    meta = ScaleEvery(factor=1.0, update_frequency=2)
    model, groups = two_group_model()
    w = OptimizerWrapper(torch.optim.SGD(groups, lr=0.1), meta, metric_reduction="mean")
    for loss in [1.0, 3.0, 5.0, 7.0, 10.0, 20.0]:
        w.update_hyperparameters({"loss": torch.tensor(loss)})
    assert meta.seen == [2.0, 6.0, 15.0]


def test_rejected_load_changes_nothing():
    from ray_metaopt import PlateauMetaOptimizer, RLMetaOptimizer

    model_a, plateau = make(PlateauMetaOptimizer(patience=0))
    x, y = data()
    for g in plateau.param_groups:
        g["lr"] = 0.1
    for _ in range(3):
        train_step(model_a, plateau, x, y)
    saved = plateau.state_dict()

    model_b, rl = make(RLMetaOptimizer(update_frequency=2, seed=0))
    train_step(model_b, rl, x, y)
    before_sd = rl.state_dict()
    before_lrs = [g["lr"] for g in rl.param_groups]
    before_steps = [s["step"].item() for s in rl.state.values()]
    with pytest.raises(ValueError, match="PlateauMetaOptimizer"):
        rl.load_state_dict(saved)
    assert [g["lr"] for g in rl.param_groups] == before_lrs
    assert [s["step"].item() for s in rl.state.values()] == before_steps
    assert repr(rl.state_dict()["meta_optimizer"]) == repr(before_sd["meta_optimizer"])
    assert rl.step_count == 1

    broken = dict(before_sd, meta_wrapper=dict(before_sd["meta_wrapper"], log={"decisions": [{"x": 1}]}))
    with pytest.raises(ValueError, match="meta_wrapper"):
        rl.load_state_dict(broken)
    assert [s["step"].item() for s in rl.state.values()] == before_steps
