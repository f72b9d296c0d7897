"""ExpertGateMetaOptimizer / SmartExpertGateMetaOptimizer on a real TinyMoE with moe_param_groups groups.

Most tests are tables: (step, metrics, expected lr / weight decay per group after that step's
``update_hyperparameters``). The model really trains (forward, backward, optimizer step) while the
routing metrics are given by the table, so every expected value is known exactly.
"""

from __future__ import annotations

import io
import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ray_metaopt import (
    ExpertGateMetaOptimizer,
    OptimizerWrapper,
    SmartExpertGateMetaOptimizer,
    TinyMoE,
    moe_param_groups,
    routing_metrics,
)

LR, WD = 0.01, 0.1


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: several torch threads only contend with the other test processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(meta, *, lr=LR, wd=WD, seed=0, **group_kwargs):
    torch.manual_seed(seed)
    model = TinyMoE(8, 16, 3, num_experts=4, top_k=1)
    groups = moe_param_groups(model, lr=lr, weight_decay=wd, verbose=False, **group_kwargs)
    return model, OptimizerWrapper(torch.optim.AdamW(groups), meta)


def train_step(model, opt, metrics, step=None, seed=None):
    gen = torch.Generator().manual_seed(step if seed is None else seed)
    x = torch.randn(32, 8, generator=gen)
    out, _ = model(x)
    loss = out.pow(2).mean()
    opt.zero_grad()
    loss.backward()
    decisions = opt.update_hyperparameters(metrics, step)
    opt.step()
    return decisions


def by_name(opt, key="lr"):
    return {g["name"]: g[key] for g in opt.param_groups}


def run_table(meta, table, key="lr", **make_kwargs):
    """Run ``table`` rows ``(step, metrics, {group name: expected value})`` and check each row."""
    model, opt = make(meta, **make_kwargs)
    for step, metrics, expected in table:
        train_step(model, opt, metrics, step)
        got = by_name(opt, key)
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-15), (step, name, got)
    return model, opt


# --------------------------------------------------------------------------- ExpertGate: entropy
def _gate(lr_scale):
    g = LR * 0.1 * lr_scale
    return {"gate": g, "gate_no_decay": g, "expert": LR * 2.0, "expert_no_decay": LR * 2.0, "shared_no_decay": LR}


ENTROPY_TABLE = [
    # step 0: the first call applies the factors only (criteria wait for the schedule)
    (0, {"loss": 1.0, "routing_entropy": 0.1}, _gate(1.0)),
    (1, {"loss": 1.0, "routing_entropy": 0.1}, _gate(1.5)),  # < 0.3: raise x1.5
    (2, {"loss": 1.0, "routing_entropy": 0.1}, _gate(1.5)),  # not a decision step
    (3, {"loss": 1.0, "routing_entropy": 0.5}, _gate(1.5)),  # in [0.3, 0.8]: keep
    (5, {"loss": 1.0, "routing_entropy": 0.2}, _gate(2.0)),  # 2.25 capped at max_gate_scale
    (7, {"loss": 1.0, "routing_entropy": 0.0}, _gate(2.0)),
    (9, {"loss": 1.0, "routing_entropy": 0.9}, _gate(2.0 / 1.5)),  # > 0.8: lower
    (11, {"loss": 1.0, "routing_entropy": 0.95}, _gate(2.0 / 1.5**2)),
    (13, {"loss": 1.0, "routing_entropy": 1.0}, _gate(2.0 / 1.5**3)),
    (15, {"loss": 1.0, "routing_entropy": 1.0}, _gate(0.5)),  # floored at min_gate_scale
    (17, {"loss": 1.0}, _gate(0.5)),  # no routing_entropy: criterion skipped
    (19, {"loss": 1.0, "routing_entropy": 0.3}, _gate(0.5)),  # == threshold: keep
    (21, {"loss": 1.0, "routing_entropy": 0.29}, _gate(0.75)),
    (23, {"loss": 1.0, "routing_entropy": 0.8}, _gate(0.75)),  # == upper edge: keep
]


def test_entropy_rule_table():
    meta = ExpertGateMetaOptimizer(
        metric_window=1,
        gate_lr_factor=0.1, expert_lr_factor=2.0, entropy_threshold=0.3, entropy_band=0.5,
        adjustment_rate=0.5, min_gate_scale=0.5, max_gate_scale=2.0, update_frequency=2,
    )
    _, opt = run_table(meta, ENTROPY_TABLE)
    # every decision names its reason; weight decay untouched
    lr_steps = sorted({d.step for d in opt.decisions})
    assert lr_steps == [0, 1, 5, 9, 11, 13, 15, 21]
    assert all(d.hparam == "lr" for d in opt.decisions)
    raise_reason = opt.log.decisions(group=0)[1].reason
    assert raise_reason.startswith("routing_entropy=0.1 < entropy_threshold=0.3: raise gate lr")
    assert by_name(opt, "weight_decay") == {
        "gate": WD, "gate_no_decay": 0.0, "expert": WD, "expert_no_decay": 0.0, "shared_no_decay": 0.0
    }


def test_factors_apply_before_the_first_optimizer_step_and_schedule_is_kept():
    meta = ExpertGateMetaOptimizer(gate_lr_factor=0.5, expert_lr_factor=3.0, entropy_threshold=0.5,
                                   update_frequency=10, gate_settle_steps=0)
    model, opt = make(meta)
    assert meta.should_update(0)
    decisions = train_step(model, opt, {"loss": 1.0, "routing_entropy": 0.0}, 0)
    assert {(d.name, d.new) for d in decisions} == {
        ("gate", LR * 0.5), ("gate_no_decay", LR * 0.5), ("expert", LR * 3.0), ("expert_no_decay", LR * 3.0)
    }
    assert meta.next_update_step == 9 and meta.gate_scale == 1.0
    for step in range(1, 9):
        assert not meta.should_update(step)
        assert train_step(model, opt, {"loss": 1.0, "routing_entropy": 0.0}, step) == []
    decisions = train_step(model, opt, {"loss": 1.0, "routing_entropy": 0.0}, 9)
    assert [d.name for d in decisions] == ["gate", "gate_no_decay"]
    assert by_name(opt)["gate"] == pytest.approx(LR * 0.5 * 1.1)


def test_min_and_max_lr_from_the_base_class_clamp_every_gate_group():
    meta = ExpertGateMetaOptimizer(metric_window=1, gate_lr_factor=1.0, adjustment_rate=1.0, max_gate_scale=100.0,
                                   max_lr={"gate": 0.03, "default": 1.0}, min_lr=0.004)
    table = [
        (0, {"routing_entropy": 0.0}, {"gate": 0.02, "gate_no_decay": 0.02, "expert": LR}),
        (1, {"routing_entropy": 0.0}, {"gate": 0.03, "gate_no_decay": 0.03}),  # 0.04 clamped
        (2, {"routing_entropy": 0.0}, {"gate": 0.03}),
        # scales are multiplicative on the current lr: halving from the clamp
        (3, {"routing_entropy": 1.0}, {"gate": 0.015}),
        (4, {"routing_entropy": 1.0}, {"gate": 0.0075}),
        (5, {"routing_entropy": 1.0}, {"gate": 0.004}),  # min_lr
    ]
    run_table(meta, table)


# --------------------------------------------------------------------------- ExpertGate: plateau
def test_plateau_rule_cuts_every_group():
    meta = ExpertGateMetaOptimizer(gate_lr_factor=0.1, patience=1, plateau_factor=0.5, cooldown=1,
                                   entropy_threshold=0.0, entropy_band=1.0, gate_settle_steps=0)

    def lrs(scale):
        return {"gate": LR * 0.1 * scale, "expert": LR * scale, "shared_no_decay": LR * scale}

    table = [
        (0, {"loss": 1.0}, lrs(1.0)),
        (1, {"loss": 1.0}, lrs(1.0)),  # 1 bad
        (2, {"loss": 0.99995}, lrs(0.5)),  # below the 1e-4 relative threshold: 2 bad > patience: cut
        (3, {"loss": 1.0}, lrs(0.5)),  # cooldown
        (4, {"loss": 1.0}, lrs(0.5)),  # 1 bad
        (5, {"loss": 0.5}, lrs(0.5)),  # improvement
        (6, {"loss": 0.6, "routing_entropy": 0.5}, lrs(0.5)),
        (7, {"loss": 0.6}, lrs(0.25)),
    ]
    _, opt = run_table(meta, table)
    cut = [d for d in opt.decisions if d.step == 2]
    assert {d.name for d in cut} == {"gate", "gate_no_decay", "expert", "expert_no_decay", "shared_no_decay"}
    assert all("plateau: loss not improved for 2 decisions" in d.reason for d in cut)


def test_plateau_rule_needs_its_monitor():
    meta = ExpertGateMetaOptimizer(patience=2, monitor="val_loss")
    model, opt = make(meta)
    with pytest.raises(KeyError, match=r"monitors 'val_loss' \(patience=2\) but the metrics at step 0 are \['loss'\]"):
        train_step(model, opt, {"loss": 1.0}, 0)


# --------------------------------------------------------------------------- smoothing of routing metrics
def _gate_scale(opt):
    return opt.param_groups[0]["lr"] / LR


def test_default_window_is_about_fifty_steps_of_data():
    from ray_metaopt.expert_gate import default_metric_window

    assert [default_metric_window(f) for f in (1, 2, 7, 50, 200)] == [50, 25, 8, 1, 1]
    assert ExpertGateMetaOptimizer().metric_window == 50
    assert ExpertGateMetaOptimizer(update_frequency=10).metric_window == 5


@pytest.mark.parametrize("load, raised", [(0.2, False), (1.5, False), (2.5, True), (None, True)])
def test_low_entropy_is_a_collapse_only_with_an_overloaded_expert(load, raised):
    meta = ExpertGateMetaOptimizer(metric_window=1)
    model, opt = make(meta)
    metrics = {"loss": 1.0, "routing_entropy": 0.1} | ({} if load is None else {"load_violation": load})
    for step in range(3):
        train_step(model, opt, metrics, step)
    assert _gate_scale(opt) == pytest.approx(1.1**3 if raised else 1.0)  # a decision at every step
    strict = ExpertGateMetaOptimizer(metric_window=1, collapse_load=None)
    model, opt = make(strict)
    for step in range(3):
        train_step(model, opt, metrics, step)
    assert _gate_scale(opt) == pytest.approx(1.1**3)


def test_per_batch_dips_below_the_threshold_do_not_move_the_gate_lr():
    # A healthy router whose per-batch entropy alternates 0.2 / 0.5 (mean 0.35, above the 0.3
    # threshold): the strict rule raises the gate lr at every low batch, the default window never.
    stream = [{"loss": 1.0, "routing_entropy": 0.2 if step % 2 else 0.5} for step in range(200)]
    scales = {}
    for window in (1, None):
        model, opt = make(ExpertGateMetaOptimizer(metric_window=window))
        for step, metrics in enumerate(stream):
            train_step(model, opt, metrics, step)
        scales[window] = _gate_scale(opt)
    assert scales[1] == pytest.approx(4.0)  # raised to max_gate_scale
    assert scales[None] == pytest.approx(1.0)


def test_a_sustained_collapse_still_raises_the_gate_lr_within_the_window():
    meta = ExpertGateMetaOptimizer()
    model, opt = make(meta)
    for step in range(60):
        train_step(model, opt, {"loss": 1.0, "routing_entropy": 0.5}, step)
    assert _gate_scale(opt) == pytest.approx(1.0)
    raised = None
    for step in range(60, 160):
        train_step(model, opt, {"loss": 1.0, "routing_entropy": 0.05}, step)
        if raised is None and _gate_scale(opt) > 1.0:
            raised = step
    # the 50-decision mean crosses 0.3 once 22 of its values are 0.05: (28 * 0.5 + 22 * 0.05) / 50 = 0.302
    assert raised == 60 + 22
    assert _gate_scale(opt) == pytest.approx(4.0)


def test_smoothing_state_resumes_and_resets():
    meta = SmartExpertGateMetaOptimizer(metric_window=3)
    model, opt = make(meta)
    for step, value in enumerate((0.9, 0.1, 0.2, 0.4)):
        train_step(model, opt, {"loss": 1.0, "routing_entropy": value, "load_violation": 0.0}, step)
    state = meta.state_dict()
    assert state["state"]["routing_recent"] == {"routing_entropy": [0.1, 0.2, 0.4], "load_violation": [0.0, 0.0, 0.0]}
    copy = SmartExpertGateMetaOptimizer(metric_window=3)
    copy.load_state_dict(state)
    assert copy.routing_recent == meta.routing_recent
    meta.reset()
    assert meta.routing_recent == {}


# --------------------------------------------------------------------------- Smart: sparsity -> gate wd
def _smart(**kwargs):
    # The rule tables give one value per decision as it is read (metric_window=1; smoothing is tested apart).
    base = dict(gate_lr_factor=1.0, sparsity_target=None, specialization_bonus=1.0, load_threshold=None, metric_window=1)
    base.update(kwargs)
    return SmartExpertGateMetaOptimizer(**base)


def test_sparsity_target_moves_gate_weight_decay_table():
    meta = _smart(sparsity_target=0.5, sparsity_tolerance=0.1, adjustment_rate=1.0, min_gate_wd_scale=0.25,
                  max_gate_wd_scale=4.0, max_weight_decay={"gate": 0.15})

    def wd(value):
        return {"gate": value, "gate_no_decay": 0.0, "expert": WD, "shared_no_decay": 0.0}

    table = [
        (0, {"routing_sparsity": 0.2}, wd(0.05)),  # below 0.4: lower
        (1, {"routing_sparsity": 0.2}, wd(0.025)),
        (2, {"routing_sparsity": 0.2}, wd(0.025)),  # min_gate_wd_scale
        (3, {"routing_sparsity": 0.5}, wd(0.025)),  # in band
        (4, {"routing_sparsity": 0.65}, wd(0.05)),  # above 0.6: raise
        (5, {"loss": 1.0}, wd(0.05)),  # missing: skipped
        (6, {"routing_sparsity": 0.9}, wd(0.1)),
        (7, {"routing_sparsity": 0.9}, wd(0.15)),  # 0.2 clamped by max_weight_decay
        (8, {"routing_sparsity": 0.0}, wd(0.075)),  # scale 2 -> 1 halves the current value
    ]
    _, opt = run_table(meta, table, key="weight_decay")
    assert by_name(opt) == {n: LR for n in by_name(opt)}  # lrs untouched (gate_lr_factor=1)
    assert "routing_sparsity=0.2 below sparsity_target=0.5: gate weight decay lowered" in opt.decisions[0].reason


# --------------------------------------------------------------------------- Smart: specialization -> expert lr
def test_specialization_bonus_table():
    meta = _smart(specialization_bonus=1.5, specialization_tolerance=0.05, max_expert_scale=2.0)

    def lrs(scale):
        return {"expert": LR * scale, "expert_no_decay": LR * scale, "gate": LR, "shared_no_decay": LR}

    table = [
        (0, {"expert_specialization": 0.2}, lrs(1.0)),  # reference
        (1, {"expert_specialization": 0.24}, lrs(1.0)),  # rise within tolerance
        (2, {"expert_specialization": 0.3}, lrs(1.5)),
        (3, {"expert_specialization": 0.5}, lrs(2.0)),  # 2.25 capped
        (4, {"expert_specialization": 0.6}, lrs(2.0)),
        (5, {"expert_specialization": 0.5}, lrs(2.0 / 1.5)),  # fell: one bonus withdrawn
        (6, {"expert_specialization": 0.4}, lrs(1.0)),  # never below the base factor
        (7, {"loss": 2.0}, lrs(1.0)),
        (8, {"expert_specialization": 0.3}, lrs(1.0)),
        (9, {"expert_specialization": 0.36}, lrs(1.5)),  # rise measured from the last reference (0.3)
    ]
    run_table(meta, table)


# --------------------------------------------------------------------------- Smart: load + entropy votes
def test_load_violation_and_entropy_votes_combine():
    meta = _smart(adjustment_rate=0.5, entropy_threshold=0.3, entropy_band=0.5, load_threshold=1.0,
                  max_gate_scale=4.0, collapse_load=1.0)

    def gate(scale):
        return {"gate": LR * scale, "gate_no_decay": LR * scale, "expert": LR}

    table = [
        (0, {"load_violation": 2.0, "routing_entropy": 0.5}, gate(1.5)),
        (1, {"load_violation": 2.0, "routing_entropy": 0.1}, gate(1.5**3)),  # two raises
        (2, {"load_violation": 2.0, "routing_entropy": 0.9}, gate(1.5**3)),  # cancel
        (3, {"load_violation": 0.5, "routing_entropy": 0.9}, gate(1.5**2)),
        (4, {"load_violation": 1.0}, gate(1.5**2)),  # == threshold: no vote
        (5, {"load_violation": 3.0}, gate(1.5**3)),
        (6, {"load_violation": 3.0, "routing_entropy": 0.1}, gate(4.0)),  # capped
    ]
    _, opt = run_table(meta, table)
    reason = [d for d in opt.decisions if d.step == 1 and d.name == "gate"][0].reason
    assert "routing_entropy=0.1 < entropy_threshold=0.3" in reason and "load_violation=2 > load_threshold=1" in reason


def test_seed_example_constructs_and_runs():
    meta = SmartExpertGateMetaOptimizer(gate_lr_factor=0.1, expert_lr_factor=1.0, entropy_threshold=0.8,
                                        sparsity_target=0.7, specialization_bonus=1.2)
    assert (meta.gate_lr_factor, meta.expert_lr_factor, meta.entropy_threshold, meta.sparsity_target,
            meta.specialization_bonus) == (0.1, 1.0, 0.8, 0.7, 1.2)
    model, opt = make(meta)
    train_step(model, opt, {"loss": 1.0, "routing_entropy": 0.5, "routing_sparsity": 0.1,
                            "load_violation": 0.0, "expert_specialization": 0.1}, 0)
    g = by_name(opt)
    # the router keeps its built lr for gate_settle_steps (49) steps; balanced load: not a collapse
    assert g["gate"] == pytest.approx(LR) and g["expert"] == LR
    assert by_name(opt, "weight_decay")["gate"] == pytest.approx(WD / 1.1)
    train_step(model, opt, {"loss": 1.0, "routing_entropy": 0.5, "routing_sparsity": 0.1,
                            "load_violation": 5.0, "expert_specialization": 0.1}, 1)
    # mean load_violation over the window 2.5: above collapse_load 2 and load_threshold 1, both raise
    assert by_name(opt)["gate"] == pytest.approx(LR * 1.1**2)


def _balanced(step):
    return {"loss": 1.0, "routing_entropy": 0.5, "routing_sparsity": 0.7, "load_violation": 0.0,
            "expert_specialization": 0.1}


def test_seed_call_router_settles_at_its_built_lr_before_gate_lr_factor_applies():
    """The seed's call (gate_lr_factor=0.1) per step: the router keeps the lr it was built with for
    the first (metric_window - 1) * update_frequency = 49 steps, then gets 0.1x at step 49.

    The old behaviour (0.1x from step 0) froze the router's random initial assignment: on 40
    development seeds of benchmarks/seed_usage.py's ``moe`` task it ended above x1.02 the unwrapped
    optimizer's loss on 11 seeds (worst x1.32); settling first: 5 seeds, worst x1.13.
    """
    meta = SmartExpertGateMetaOptimizer(gate_lr_factor=0.1, expert_lr_factor=1.0, entropy_threshold=0.8,
                                        sparsity_target=0.7, specialization_bonus=1.2)
    assert meta.metric_window == 50 and meta.gate_settle_steps == 49
    model, opt = make(meta)
    for step in range(49):
        train_step(model, opt, _balanced(step), step)
        assert by_name(opt)["gate"] == pytest.approx(LR), step  # no rule moved the gate scale
        assert meta.gate_scale == 1.0 and not meta.gate_factor_on
    decisions = train_step(model, opt, _balanced(49), 49)
    assert by_name(opt)["gate"] == pytest.approx(LR * 0.1)
    assert by_name(opt)["gate_no_decay"] == pytest.approx(LR * 0.1)
    assert by_name(opt)["expert"] == LR
    reason = next(d.reason for d in decisions if d.name == "gate" and d.hparam == "lr")
    assert "step 49 >= gate_settle_steps=49: gate_lr_factor=0.1 applies" in reason
    train_step(model, opt, _balanced(50), 50)
    assert by_name(opt)["gate"] == pytest.approx(LR * 0.1)  # applied once


@pytest.mark.parametrize("kwargs, settle", [
    ({}, 49),                                     # per step, 50-step window
    ({"update_frequency": 10}, 40),               # window ceil(50/10) = 5 decisions
    ({"metric_window": 1}, 0),                    # values read as given (the Tune trainable)
    ({"update_frequency": 50}, 0),
    ({"gate_settle_steps": 7}, 7),
])
def test_gate_settle_steps_default_is_the_first_full_metric_window(kwargs, settle):
    for cls in (ExpertGateMetaOptimizer, SmartExpertGateMetaOptimizer):
        assert cls(gate_lr_factor=0.1, **kwargs).gate_settle_steps == settle


def test_gate_settle_zero_applies_the_factor_at_the_first_call_and_survives_reset():
    meta = SmartExpertGateMetaOptimizer(gate_lr_factor=0.1, metric_window=1)
    model, opt = make(meta)
    train_step(model, opt, _balanced(0), 0)
    assert by_name(opt)["gate"] == pytest.approx(LR * 0.1)
    meta.reset()
    train_step(model, opt, _balanced(1), 1)
    assert by_name(opt)["gate"] == pytest.approx(LR * 0.1)  # reset does not bring the built lr back


# --------------------------------------------------------------------------- dynamic groups
def test_groups_added_or_changed_during_training():
    meta = SmartExpertGateMetaOptimizer(metric_window=1, gate_lr_factor=0.1, expert_lr_factor=2.0, entropy_threshold=0.3,
                                        specialization_bonus=1.5, sparsity_target=None, load_threshold=None,
                                        adjustment_rate=0.5, update_frequency=2)
    model, opt = make(meta)
    stream = {"routing_entropy": 0.1, "expert_specialization": 0.0}
    train_step(model, opt, stream, 0)
    train_step(model, opt, stream, 1)  # gate scale 1.5
    stream = {"routing_entropy": 0.5, "expert_specialization": 0.5}
    train_step(model, opt, stream, 2)
    train_step(model, opt, stream, 3)  # expert scale 1.5
    assert by_name(opt)["expert"] == pytest.approx(LR * 2.0 * 1.5)

    new = model.add_expert()
    opt.add_param_group({"params": new["expert"], "name": "expert_4", "role": "expert", "lr": 0.005,
                         "weight_decay": WD})
    opt.add_param_group({"params": new["gate"], "name": "gate_4", "role": "gate", "lr": 0.004, "weight_decay": 0.0})
    train_step(model, opt, stream, 4)  # not a decision step: new groups keep their lr
    assert by_name(opt)["expert_4"] == 0.005
    decisions = train_step(model, opt, stream, 5)
    lrs = by_name(opt)
    assert lrs["expert_4"] == pytest.approx(0.005 * 2.0 * 1.5)  # own initial lr x current expert scale
    assert lrs["gate_4"] == pytest.approx(0.004 * 0.1 * 1.5)
    assert lrs["expert"] == pytest.approx(LR * 2.0 * 1.5)  # old groups unchanged
    assert {d.name for d in decisions} == {"expert_4", "gate_4"}
    assert all(d.reason.startswith("new ") for d in decisions)
    _, logits = model(torch.randn(4, 8))
    assert logits.shape == (4, 5)

    # re-classification: the new expert becomes a shared group, the old expert group a gate group
    opt.param_groups[5]["role"] = "shared"
    opt.param_groups[2]["role"] = "gate"
    train_step(model, opt, stream, 6)
    decisions = train_step(model, opt, stream, 7)
    lrs = by_name(opt)
    assert lrs["expert_4"] == pytest.approx(0.005)
    assert lrs["expert"] == pytest.approx(LR * 0.1 * 1.5)
    assert lrs["expert_no_decay"] == pytest.approx(LR * 2.0 * 1.5)
    reasons = {d.name: d.reason for d in decisions}
    assert reasons["expert_4"].startswith("re-classified expert -> other")
    assert reasons["expert"].startswith("re-classified expert -> gate")


def test_groups_found_by_name_when_they_have_no_role():
    torch.manual_seed(0)
    model = TinyMoE(8, 16, 3, num_experts=4, top_k=1)
    groups = [
        {"params": list(model.gate.parameters()), "name": "router"},
        {"params": list(model.experts.parameters()), "name": "moe_experts"},
        {"params": list(model.norm.parameters()), "name": "norm"},
    ]
    meta = ExpertGateMetaOptimizer(gate_lr_factor=0.1, expert_lr_factor=0.5, gate_settle_steps=0)
    opt = OptimizerWrapper(torch.optim.SGD(groups, lr=LR), meta)
    train_step(model, opt, {}, 0)
    assert by_name(opt) == pytest.approx({"router": LR * 0.1, "moe_experts": LR * 0.5, "norm": LR})
    assert by_name(opt, "weight_decay") == {"router": 0, "moe_experts": 0, "norm": 0}


def test_custom_group_patterns_and_missing_gate_error():
    torch.manual_seed(0)
    model = TinyMoE(8, 16, 3, num_experts=4, top_k=1)
    groups = [{"params": list(model.gate.parameters()), "name": "w_g"},
              {"params": list(model.experts.parameters()) + list(model.norm.parameters()), "name": "ffn"}]
    with pytest.raises(ValueError, match=re.escape(
            "ExpertGateMetaOptimizer found no gate (router) param group: give the router's group role='gate' "
            "(moe_param_groups does) or a name matching gate_groups=['gate', 'router']; "
            "got groups (index, name, role) [(0, 'w_g', ''), (1, 'ffn', '')]")):
        OptimizerWrapper(torch.optim.SGD(groups, lr=LR), ExpertGateMetaOptimizer())
    meta = ExpertGateMetaOptimizer(gate_groups=r"^w_g$", expert_groups="ffn", gate_lr_factor=0.1, expert_lr_factor=2.0,
                                   gate_settle_steps=0)
    opt = OptimizerWrapper(torch.optim.SGD(groups, lr=LR), meta)
    train_step(model, opt, {}, 0)
    assert by_name(opt) == pytest.approx({"w_g": LR * 0.1, "ffn": LR * 2.0})
    # a role wins over the name: a group named "gate" with role "shared" is not a gate
    bad = [{"params": list(model.parameters()), "name": "gate", "role": "shared"}]
    with pytest.raises(ValueError, match="found no gate"):
        OptimizerWrapper(torch.optim.SGD(bad, lr=LR), SmartExpertGateMetaOptimizer())


def test_group_with_zero_lr_catches_up_when_positive():
    meta = ExpertGateMetaOptimizer(gate_lr_factor=0.1, gate_settle_steps=0)
    model, opt = make(meta)
    opt.param_groups[0]["lr"] = 0.0  # e.g. a warmup that starts at 0
    train_step(model, opt, {}, 0)
    assert by_name(opt)["gate"] == 0.0 and by_name(opt)["gate_no_decay"] == pytest.approx(LR * 0.1)
    opt.param_groups[0]["lr"] = 0.02
    train_step(model, opt, {}, 1)
    assert by_name(opt)["gate"] == pytest.approx(0.002)
    train_step(model, opt, {}, 2)
    assert by_name(opt)["gate"] == pytest.approx(0.002)  # applied once


# --------------------------------------------------------------------------- scheduler composition
def test_entropy_changes_compose_with_an_attached_cosine_schedule():
    meta = ExpertGateMetaOptimizer(metric_window=1, gate_lr_factor=0.1, entropy_threshold=0.3, adjustment_rate=0.5,
                                   max_gate_scale=2.0)
    model, opt = make(meta)
    sched = opt.attach_scheduler(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20))
    entropies = [0.1, 0.1, 0.5, 0.1, 0.99, 0.5, 0.5, 0.5]
    scales = [1.5, 2.0, 2.0, 2.0, 2.0 / 1.5, 2.0 / 1.5, 2.0 / 1.5, 2.0 / 1.5]
    for step, (h, scale) in enumerate(zip(entropies, scales)):
        cos = (1 + math.cos(math.pi * step / 20)) / 2
        train_step(model, opt, {"routing_entropy": h}, step)
        lrs = by_name(opt)
        assert lrs["gate"] == pytest.approx(LR * cos * 0.1 * scale, rel=1e-9), step
        assert lrs["expert"] == pytest.approx(LR * cos, rel=1e-9), step
        sched.step()


# --------------------------------------------------------------------------- NaN, missing, reset, resume
def test_nan_routing_metric_skips_the_decision_and_changes_no_state():
    meta = SmartExpertGateMetaOptimizer(gate_lr_factor=0.1, entropy_threshold=0.3, update_frequency=1)
    model, opt = make(meta)
    good = {"loss": 1.0, "routing_entropy": 0.1, "routing_sparsity": 0.9, "load_violation": 2.0,
            "expert_specialization": 0.3}
    train_step(model, opt, good, 0)
    train_step(model, opt, good, 1)
    before_state, before_lrs, before_wd = meta.state_dict(), by_name(opt), by_name(opt, "weight_decay")
    for bad in (float("nan"), float("inf")):
        assert train_step(model, opt, {**good, "routing_entropy": torch.tensor(bad)}, 2) == []
    assert meta.state_dict() == before_state
    assert by_name(opt) == before_lrs and by_name(opt, "weight_decay") == before_wd
    assert [s.reason for s in opt.log.skipped] == ["non-finite metric routing_entropy=nan",
                                                   "non-finite metric routing_entropy=inf"]
    assert meta.should_update(2)  # the decision is retried next step
    assert train_step(model, opt, good, 2) != []


def test_reset_returns_to_the_factor_scales_without_applying_them_twice():
    meta = SmartExpertGateMetaOptimizer(gate_lr_factor=0.1, expert_lr_factor=2.0, entropy_threshold=0.3,
                                        specialization_bonus=1.5, sparsity_target=0.5, load_threshold=None,
                                        gate_settle_steps=0)
    model, opt = make(meta)
    for step, spec in enumerate([0.0, 0.5, 0.9]):
        train_step(model, opt, {"routing_entropy": 0.0, "expert_specialization": spec, "routing_sparsity": 0.0},
                   step)
    assert by_name(opt)["gate"] != pytest.approx(LR * 0.1)
    meta.reset()
    assert (meta.gate_scale, meta.expert_scale, meta.gate_wd_scale, meta.specialization_ref) == (1.0, 1.0, 1.0, None)
    train_step(model, opt, {"routing_entropy": 0.5}, 3)  # no criterion fires
    assert by_name(opt) == pytest.approx(_gate(1.0))
    assert by_name(opt, "weight_decay")["gate"] == pytest.approx(WD)


def clustered_batch(step, *, clusters=4, dim=8, n=128):
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(clusters, dim, generator=gen) * 3
    maps = torch.randn(clusters, dim, 3, generator=gen)
    gen = torch.Generator().manual_seed(1000 + step)
    labels = torch.randint(0, clusters, (n,), generator=gen)
    x = centers[labels] + torch.randn(n, dim, generator=gen)
    y = torch.einsum("nd,ndo->no", x, maps[labels])
    return x, y, labels


def real_step(model, opt, step):
    x, y, labels = clustered_batch(step)
    out, logits = model(x)
    loss = F.mse_loss(out, y)
    opt.zero_grad()
    loss.backward()
    metrics = {"loss": loss.detach(), **routing_metrics(logits, labels=labels, num_labels=4, as_tensors=True)}
    decisions = opt.update_hyperparameters(metrics)
    opt.step()
    return {k: float(v) for k, v in metrics.items()}, decisions


def seed_smart(**kwargs):
    return SmartExpertGateMetaOptimizer(gate_lr_factor=0.1, expert_lr_factor=1.0, entropy_threshold=0.8,
                                        sparsity_target=0.7, specialization_bonus=1.2, **kwargs)


@pytest.mark.parametrize("split", [7, 18])
def test_resume_is_bit_exact(split, tmp_path):
    def build():
        torch.manual_seed(0)
        model = TinyMoE(8, 32, 3, num_experts=4, top_k=1)
        meta = seed_smart(update_frequency=3, patience=2)
        return model, OptimizerWrapper(torch.optim.AdamW(moe_param_groups(model, lr=3e-3, verbose=False)), meta)

    model, opt = build()
    for step in range(30):
        real_step(model, opt, step)
    reference = ([d.to_dict() for d in opt.decisions], by_name(opt), by_name(opt, "weight_decay"),
                 [p.detach().clone() for p in model.parameters()])

    model, opt = build()
    for step in range(split):
        real_step(model, opt, step)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    model, opt = build()
    ckpt = torch.load(path, weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    for step in range(split, 30):
        real_step(model, opt, step)
    assert [d.to_dict() for d in opt.decisions] == reference[0]
    assert by_name(opt) == reference[1] and by_name(opt, "weight_decay") == reference[2]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference[3]))
    assert len(reference[0]) > 5


def test_state_dict_is_plain_data():
    meta = seed_smart(patience=1)
    model, opt = make(meta)
    for step in range(4):
        train_step(model, opt, {"loss": 1.0, "routing_entropy": 0.2, "expert_specialization": 0.1 * step}, step)
    buffer = io.BytesIO()
    torch.save(meta.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded == meta.state_dict()
    other = seed_smart(patience=1)
    other.load_state_dict(loaded)
    assert other.state_dict() == meta.state_dict()
    with pytest.raises(ValueError, match="cannot load it into ExpertGateMetaOptimizer"):
        ExpertGateMetaOptimizer().load_state_dict(loaded)


# --------------------------------------------------------------------------- a real training run
@pytest.mark.slow
@pytest.mark.parametrize("load_threshold", [None, 1.0])
def test_real_training_routing_metrics_drive_the_gate_lr_as_documented(load_threshold):
    """TinyMoE on 4 clustered regression tasks, seed configuration, metrics from the real router logits.

    The gate lr is checked at every step against the documented rule replayed on the recorded
    metrics: at each decision, with each metric averaged over the last ``metric_window`` (10)
    decisions, scale *= 1.1 ** vote (entropy < 0.8 with load_violation > 1: +1, entropy > 0.8 +
    0.65: -1, load_violation > load_threshold: +1), clamped to [0.25, 4].
    """
    torch.manual_seed(0)
    model = TinyMoE(8, 32, 3, num_experts=4, top_k=1)
    # collapse_load=1.0 (the default is 2.0): this router's mean load_violation stays between 1
    # and 2, so the entropy raise is exercised only below the default's bar
    # gate_settle_steps=0: the table below starts the router at gate_lr_factor from step 0
    meta = seed_smart(update_frequency=5, load_threshold=load_threshold, collapse_load=1.0, gate_settle_steps=0)
    opt = OptimizerWrapper(torch.optim.AdamW(moe_param_groups(model, lr=3e-3, verbose=False)), meta)
    gate_lr0 = 3e-3 * 0.1
    scale, history, smoothed_entropy = 1.0, [], []
    for step in range(300):
        metrics, _ = real_step(model, opt, step)
        history.append(metrics)
        if step % 5 == 4:
            seen = history[4::5][-meta.metric_window:]
            entropy = sum(m["routing_entropy"] for m in seen) / len(seen)
            load = sum(m["load_violation"] for m in seen) / len(seen)
            smoothed_entropy.append((step, entropy))
            vote = (entropy < 0.8 and load > 1.0) - (entropy > 1.45)  # collapse_load=1.0
            if load_threshold is not None:
                vote += load > load_threshold
            scale = min(max(scale * 1.1**vote, 0.25), 4.0)
        assert opt.param_groups[0]["lr"] == pytest.approx(gate_lr0 * scale, rel=1e-9), (step, metrics)
        assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"]
    gate_decisions = opt.log.decisions(group=0, hparam="lr")
    assert len(gate_decisions) >= 4 and scale > 1.0
    if load_threshold is None:
        # the router learned: entropy fell below the threshold late in training and raised the gate lr
        first_low = next(step for step, entropy in smoothed_entropy if entropy < 0.8)
        assert 100 < first_low < 300
        assert all("< entropy_threshold=0.8: raise gate lr" in d.reason for d in gate_decisions[1:])
        assert gate_decisions[1].step == first_low
    else:
        assert any("load_violation=" in d.reason for d in gate_decisions)
    # specialization rose and the experts got the bonus; sparsity stayed below target: gate wd lowered
    assert max(m["expert_specialization"] for m in history[-50:]) > history[0]["expert_specialization"] + 0.05
    assert any("expert_specialization rose" in d.reason for d in opt.log.decisions(group=2))
    assert opt.param_groups[2]["lr"] > 3e-3
    assert all(m["routing_sparsity"] < 0.65 for m in history)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.01 * 0.1)  # min_gate_wd_scale
    assert sum(m["loss"] for m in history[-10:]) < 0.2 * sum(m["loss"] for m in history[:10])


# --------------------------------------------------------------------------- property: bounds hold
metric_value = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64),
                         st.floats(min_value=0.0, max_value=1.0))
metric_dicts = st.dictionaries(
    st.sampled_from(["loss", "routing_entropy", "routing_sparsity", "load_violation", "expert_specialization"]),
    metric_value,
)


@settings(max_examples=40, deadline=None)
@given(st.lists(metric_dicts, min_size=1, max_size=25))
@example([{"loss": math.inf}])
@example([{"routing_entropy": 0.0, "load_violation": 9.0}] * 25)
def test_any_metric_stream_keeps_lrs_finite_and_within_bounds(stream):
    meta = SmartExpertGateMetaOptimizer(min_lr=1e-4, max_lr={"gate": 5e-3, "default": 0.05},
                                        max_weight_decay=0.5, adjustment_rate=0.7)
    torch.manual_seed(0)
    model = TinyMoE(4, 4, 2, num_experts=2, top_k=1)
    # initial lrs inside the bounds: bounds apply to decisions, a skipped one leaves the lr as built
    opt = OptimizerWrapper(torch.optim.AdamW(moe_param_groups(model, lr=0.004, verbose=False)), meta)
    for metrics in stream:
        opt.update_hyperparameters(metrics)
        for g in opt.param_groups:
            high = 5e-3 if g["role"] == "gate" else 0.05
            assert math.isfinite(g["lr"]) and 1e-4 <= g["lr"] <= high
            assert math.isfinite(g["weight_decay"]) and 0.0 <= g["weight_decay"] <= 0.5
        assert meta.min_gate_scale <= meta.gate_scale <= meta.max_gate_scale
        assert 1.0 <= meta.expert_scale <= meta.max_expert_scale
        assert meta.min_gate_wd_scale <= meta.gate_wd_scale <= meta.max_gate_wd_scale


# --------------------------------------------------------------------------- bad arguments
BAD_ARGS = [
    (ExpertGateMetaOptimizer, {"gate_lr_factor": 0.0}, ValueError, "gate_lr_factor must be in (0, inf), got gate_lr_factor=0.0"),
    (ExpertGateMetaOptimizer, {"expert_lr_factor": -1}, ValueError, "expert_lr_factor must be in (0, inf), got expert_lr_factor=-1"),
    (ExpertGateMetaOptimizer, {"expert_lr_factor": "1"}, TypeError, "expert_lr_factor must be a real number, got expert_lr_factor='1'"),
    (ExpertGateMetaOptimizer, {"entropy_threshold": 1.5}, ValueError, "entropy_threshold must be in [0, 1], got entropy_threshold=1.5"),
    (ExpertGateMetaOptimizer, {"entropy_threshold": float("nan")}, ValueError, "entropy_threshold must not be NaN"),
    (ExpertGateMetaOptimizer, {"entropy_band": -0.1}, ValueError, "entropy_band must be in [0, 1], got entropy_band=-0.1"),
    (ExpertGateMetaOptimizer, {"adjustment_rate": 0}, ValueError, "adjustment_rate must be in (0, inf), got adjustment_rate=0"),
    (ExpertGateMetaOptimizer, {"min_gate_scale": 1.5}, ValueError, "min_gate_scale must be in (0, 1], got min_gate_scale=1.5"),
    (ExpertGateMetaOptimizer, {"max_gate_scale": 0.5}, ValueError, "max_gate_scale must be in [1, inf), got max_gate_scale=0.5"),
    (ExpertGateMetaOptimizer, {"gate_groups": ["("]}, ValueError, "gate_groups has an invalid regular expression '('"),
    (ExpertGateMetaOptimizer, {"expert_groups": [""]}, ValueError, "expert_groups must not contain an empty pattern"),
    (ExpertGateMetaOptimizer, {"expert_groups": 3}, TypeError, "expert_groups must be a str, a compiled regex"),
    (ExpertGateMetaOptimizer, {"patience": -1}, ValueError, "patience must be >= 0, got patience=-1"),
    (ExpertGateMetaOptimizer, {"patience": 2.5}, TypeError, "patience must be an int, got patience=2.5"),
    (ExpertGateMetaOptimizer, {"plateau_factor": 1.0}, ValueError, "plateau_factor must be in (0, 1), got plateau_factor=1.0"),
    (ExpertGateMetaOptimizer, {"plateau_threshold": -1e-4}, ValueError, "plateau_threshold must be in [0, inf)"),
    (ExpertGateMetaOptimizer, {"cooldown": -1}, ValueError, "cooldown must be >= 0, got cooldown=-1"),
    (ExpertGateMetaOptimizer, {"monitor": ""}, TypeError, "monitor must be a metric name (non-empty str), got monitor=''"),
    (ExpertGateMetaOptimizer, {"collapse_load": -0.5}, ValueError, "collapse_load must be in [0, inf), got collapse_load=-0.5"),
    (ExpertGateMetaOptimizer, {"metric_window": 0}, ValueError, "metric_window must be >= 1, got metric_window=0"),
    (ExpertGateMetaOptimizer, {"metric_window": 2.0}, TypeError, "metric_window must be an int, got metric_window=2.0"),
    (ExpertGateMetaOptimizer, {"gate_settle_steps": -1}, ValueError, "gate_settle_steps must be >= 0, got gate_settle_steps=-1"),
    (SmartExpertGateMetaOptimizer, {"gate_settle_steps": 1.5}, TypeError, "gate_settle_steps must be an int, got gate_settle_steps=1.5"),
    (ExpertGateMetaOptimizer, {"update_frequency": 0}, ValueError, "update_frequency must be >= 1, got update_frequency=0"),
    (ExpertGateMetaOptimizer, {"min_lr": -1.0}, ValueError, "min_lr must be in [0, inf], got min_lr=-1.0"),
    (SmartExpertGateMetaOptimizer, {"sparsity_target": 1.2}, ValueError, "sparsity_target must be in [0, 1], got sparsity_target=1.2"),
    (SmartExpertGateMetaOptimizer, {"specialization_bonus": 0.9}, ValueError, "specialization_bonus must be in [1, inf), got specialization_bonus=0.9"),
    (SmartExpertGateMetaOptimizer, {"specialization_bonus": None}, TypeError, "specialization_bonus must be a real number, got specialization_bonus=None"),
    (SmartExpertGateMetaOptimizer, {"sparsity_tolerance": 1.0}, ValueError, "sparsity_tolerance must be in [0, 1), got sparsity_tolerance=1.0"),
    (SmartExpertGateMetaOptimizer, {"min_gate_wd_scale": 0.0}, ValueError, "min_gate_wd_scale must be in (0, 1], got min_gate_wd_scale=0.0"),
    (SmartExpertGateMetaOptimizer, {"max_gate_wd_scale": 0.9}, ValueError, "max_gate_wd_scale must be in [1, inf), got max_gate_wd_scale=0.9"),
    (SmartExpertGateMetaOptimizer, {"specialization_tolerance": 2}, ValueError, "specialization_tolerance must be in [0, 1], got specialization_tolerance=2"),
    (SmartExpertGateMetaOptimizer, {"max_expert_scale": 0.5}, ValueError, "max_expert_scale must be in [1, inf), got max_expert_scale=0.5"),
    (SmartExpertGateMetaOptimizer, {"load_threshold": -1.0}, ValueError, "load_threshold must be in [0, inf), got load_threshold=-1.0"),
    (SmartExpertGateMetaOptimizer, {"gate_lr_factor": float("inf")}, ValueError, "gate_lr_factor must be in (0, inf), got gate_lr_factor=inf"),
    (SmartExpertGateMetaOptimizer, {"no_such_argument": 1}, TypeError, "no_such_argument"),
]


@pytest.mark.parametrize("cls, kwargs, exc, message", BAD_ARGS, ids=[f"{c.__name__}-{next(iter(k))}" for c, k, *_ in BAD_ARGS])
def test_bad_arguments(cls, kwargs, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        cls(**kwargs)


def test_unknown_group_in_bounds_is_reported_at_wrapper_construction():
    with pytest.raises(ValueError, match=r"max_lr names unknown param groups \['routr'\]"):
        make(ExpertGateMetaOptimizer(max_lr={"routr": 1e-3}))


# --------------------------------------------------------------------------- CUDA: no host sync between decisions
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_loop_syncs_only_at_decision_steps():
    torch.manual_seed(0)
    model = TinyMoE(8, 32, 3, num_experts=4, top_k=1).cuda()
    meta = seed_smart(update_frequency=10)
    opt = OptimizerWrapper(torch.optim.AdamW(moe_param_groups(model, lr=3e-3, verbose=False)), meta)
    decision_steps = []
    for step in range(60):
        x, y, labels = (t.cuda() for t in clustered_batch(step))
        torch.cuda.synchronize()
        due = meta.should_update(step)
        if not due:
            torch.cuda.set_sync_debug_mode("error")
        try:
            out, logits = model(x)
            loss = F.mse_loss(out, y)
            metrics = {"loss": loss.detach(),
                       **routing_metrics(logits, labels=labels, num_labels=4, as_tensors=True)}
            decisions = opt.update_hyperparameters(metrics)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if due:
            decision_steps.append(step)
        else:
            assert decisions == []
    assert decision_steps == [0, 9, 19, 29, 39, 49, 59]
    assert opt.param_groups[0]["lr"] != 3e-3 * 0.1  # the strategy acted on the CUDA metrics


@pytest.mark.parametrize("cls", [ExpertGateMetaOptimizer, SmartExpertGateMetaOptimizer])
def test_default_gate_lr_factor_leaves_the_router_lr_alone(cls):
    # 0.1 by default made a plain per-step TinyMoE loop x1.05-x1.94 worse (benchmarks/seed_usage.py).
    assert cls().gate_lr_factor == 1.0
    meta = cls(sparsity_target=None, load_threshold=None) if cls is SmartExpertGateMetaOptimizer else cls()
    model, opt = make(meta)
    train_step(model, opt, {}, 0)
    assert set(by_name(opt).values()) == {LR}
