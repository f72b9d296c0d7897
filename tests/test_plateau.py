"""PlateauMetaOptimizer and AdvancedPlateauMetaOptimizer, driven through a real OptimizerWrapper.

Most tests feed a table of metrics (one dict per step) to ``update_hyperparameters`` on a tiny
real model and compare the lr / weight decay of every param group after each step with the
expected sequence.
"""

from __future__ import annotations

import functools
import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_metaopt import AdaptiveFrequency, OptimizerWrapper
from ray_metaopt import plateau
from ray_metaopt.plateau import relative_slope, slope

# The per-step tables below pin the strict (torch-exact) rule, which a metric named "loss" gets only
# when asked for (noise_aware="auto" is noise-aware there): every table states it explicitly.
# The noise-aware rule has its own tests at the end of this file.
PlateauMetaOptimizer = functools.partial(plateau.PlateauMetaOptimizer, noise_aware=False)
AdvancedPlateauMetaOptimizer = functools.partial(plateau.AdvancedPlateauMetaOptimizer, noise_aware=False)

LR = 0.1


# ----------------------------------------------------------------------------- helpers
class Sum(torch.nn.Module):
    """One Linear(3, 1) per param group; the output is their sum."""

    def __init__(self, n: int):
        super().__init__()
        self.parts = torch.nn.ModuleList(torch.nn.Linear(3, 1) for _ in range(n))

    def forward(self, x):
        return sum(p(x) for p in self.parts)


def build(meta, groups=({"lr": LR, "weight_decay": 0.01},), optimizer=torch.optim.SGD, **wrapper_kwargs):
    """A real model with one param group per entry of ``groups`` (extra keys: name, role, ...)."""
    torch.manual_seed(0)
    model = Sum(len(groups))
    param_groups = [dict(g, params=model.parts[i].parameters()) for i, g in enumerate(groups)]
    return model, OptimizerWrapper(optimizer(param_groups, lr=LR), meta, **wrapper_kwargs)


def run(model, opt, rows, steps=None):
    """Train one step per metrics row; return (lrs, wds): per step, one value per param group,
    read after ``update_hyperparameters`` (the values that step trains with)."""
    x = torch.linspace(-1, 1, 24).reshape(8, 3)
    y = x.sum(dim=1, keepdim=True)
    lrs, wds = [], []
    for i, row in enumerate(rows):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.update_hyperparameters(row, None if steps is None else steps[i])
        opt.step()
        lrs.append([g["lr"] for g in opt.param_groups])
        wds.append([g.get("weight_decay") for g in opt.param_groups])
    return lrs, wds


def losses(*values, key="loss"):
    return [{key: v} for v in values]


def column(rows, i=0):
    return [r[i] for r in rows]


def approx(values):
    return pytest.approx(values, rel=1e-12, abs=0)


# ----------------------------------------------------------------------------- plateau rule
PLATEAU_CASES = {
    # name: (kwargs, monitored values, expected lr multipliers of LR per step)
    "patience": (
        dict(patience=2, lr_factor=0.5),
        [1.0, 0.9, 0.95, 0.92, 0.91, 0.93, 0.8, 0.85, 0.86, 0.87],
        [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.25],
    ),
    "rel_threshold": (
        dict(patience=0, lr_factor=0.5, threshold=0.1),
        [1.0, 0.95, 0.85, 0.8, 0.7],
        [1, 0.5, 0.5, 0.25, 0.25],
    ),
    "abs_threshold": (
        dict(patience=1, lr_factor=0.5, threshold=0.05, threshold_mode="abs"),
        [1.0, 0.96, 0.94, 0.9, 0.89, 0.88],
        [1, 1, 1, 1, 0.5, 0.5],
    ),
    "cooldown": (
        dict(patience=0, lr_factor=0.5, cooldown=2),
        [1.0] * 7,
        [1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25],
    ),
    "mode_max": (
        dict(patience=1, lr_factor=0.5, mode="max", monitor="acc"),
        [0.5, 0.6, 0.6, 0.6, 0.7, 0.69, 0.7],
        [1, 1, 1, 0.5, 0.5, 0.5, 0.25],
    ),
    # |best| makes "rel" work for negative metrics: -1.05 is not 10% better than -1.0
    # (torch's best * (1 - threshold) would count it as better).
    "negative_rel": (
        dict(patience=0, lr_factor=0.5, threshold=0.1),
        [-1.0, -1.05, -1.2],
        [1, 0.5, 0.5],
    ),
    "eps_ignores_small_cuts": (
        dict(patience=0, lr_factor=0.5, eps=0.06),
        [1.0, 1.0, 1.0],
        [1, 1, 1],
    ),
    "factor_0.3": (
        dict(patience=0, lr_factor=0.3),
        [1.0, 1.0, 1.0],
        [1, 0.3, 0.09],
    ),
    "min_lr_floor": (
        dict(patience=0, lr_factor=0.5, min_lr=0.03),
        [1.0] * 5,
        [1, 0.5, 0.3, 0.3, 0.3],
    ),
}


@pytest.mark.parametrize("case", PLATEAU_CASES, ids=list(PLATEAU_CASES))
def test_plateau_lr_per_step(case):
    kwargs, values, expected = PLATEAU_CASES[case]
    meta = PlateauMetaOptimizer(**kwargs)
    model, opt = build(meta)
    lrs, _ = run(model, opt, losses(*values, key=meta.monitor))
    assert column(lrs) == approx([LR * m for m in expected])
    cuts = [d for d in opt.decisions if d.hparam == "lr"]
    assert all(d.reason.startswith("plateau:") and f"patience={meta.patience}" in d.reason for d in cuts)


def test_advanced_with_single_criterion_and_no_window_matches_plateau():
    """A trend criterion that always agrees (huge trend_threshold) reduces "all" to the plain rule."""
    kwargs, values, expected = PLATEAU_CASES["patience"]
    meta = AdvancedPlateauMetaOptimizer(**kwargs, trend_window=2, trend_threshold=1e9, gap_threshold=None)
    model, opt = build(meta)
    lrs, _ = run(model, opt, losses(*values))
    assert column(lrs) == approx([LR * m for m in expected])


# ----------------------------------------------------------------------------- groups
TWO_GROUPS = (
    {"lr": 0.1, "weight_decay": 0.01, "name": "body", "role": "shared"},
    {"lr": 0.01, "weight_decay": 0.0, "name": "head", "role": "expert"},
)

GROUP_CASES = {
    "all_groups_each_own_lr": (dict(), [[0.1, 0.01], [0.05, 0.005], [0.025, 0.0025]]),
    "by_name": (dict(groups=["head"]), [[0.1, 0.01], [0.1, 0.005], [0.1, 0.0025]]),
    "by_role": (dict(groups=["shared"]), [[0.1, 0.01], [0.05, 0.01], [0.025, 0.01]]),
    "by_index": (dict(groups=[1]), [[0.1, 0.01], [0.1, 0.005], [0.1, 0.0025]]),
    "min_lr_dict": (
        dict(min_lr={"body": 0.04, "default": 0.0}),
        [[0.1, 0.01], [0.05, 0.005], [0.04, 0.0025]],
    ),
    "min_lr_list": (dict(min_lr=[0.06, 0.004]), [[0.1, 0.01], [0.06, 0.005], [0.06, 0.004]]),
    "max_lr_role": (dict(max_lr={"expert": 0.004}), [[0.1, 0.01], [0.05, 0.004], [0.025, 0.002]]),
}


@pytest.mark.parametrize("case", GROUP_CASES, ids=list(GROUP_CASES))
@pytest.mark.parametrize("cls", [PlateauMetaOptimizer, AdvancedPlateauMetaOptimizer])
def test_groups_and_bounds(cls, case):
    kwargs, expected = GROUP_CASES[case]
    extra = dict(criteria="any", trend_window=50) if cls is AdvancedPlateauMetaOptimizer else {}
    model, opt = build(cls(patience=0, lr_factor=0.5, **kwargs, **extra), groups=TWO_GROUPS)
    lrs, _ = run(model, opt, losses(1.0, 1.0, 1.0))
    assert lrs == [approx(row) for row in expected]


def test_group_added_during_training_is_cut_too():
    model, opt = build(PlateauMetaOptimizer(patience=0, lr_factor=0.5))
    run(model, opt, losses(1.0, 1.0))
    extra = torch.nn.Linear(2, 2)
    opt.add_param_group({"params": extra.parameters(), "lr": 0.2, "name": "late"})
    lrs, _ = run(model, opt, losses(1.0))
    assert lrs[-1] == approx([0.025, 0.1])


@pytest.mark.parametrize(
    "groups, match",
    [(["tail"], "unknown param group 'tail'"), ([5], "param group index 5"), (["head", "nope"], "'nope'")],
)
def test_unknown_groups_raise_at_wrapper_construction(groups, match):
    with pytest.raises(ValueError, match=match):
        build(PlateauMetaOptimizer(groups=groups), groups=TWO_GROUPS)


# ----------------------------------------------------------------------------- weight decay
WD_CASES = {
    # name: (kwargs, groups, grad norms, expected wd per step per group)
    "raise_cap_and_no_decay_group": (
        dict(grad_norm_threshold=5.0, weight_decay_factor=2.0),
        TWO_GROUPS,
        [1.0, 6.0, 4.0, 7.0, 8.0, 9.0, 10.0],
        [[0.01, 0.0], [0.02, 0.0], [0.02, 0.0], [0.04, 0.0], [0.08, 0.0], [0.1, 0.0], [0.1, 0.0]],
    ),
    "absolute_max_weight_decay": (
        dict(
            grad_norm_threshold=5.0, weight_decay_factor=2.0, max_weight_decay={"body": 0.05, "default": 1.0}
        ),
        TWO_GROUPS,
        [6.0, 6.0, 6.0, 6.0],
        [[0.02, 0.0], [0.04, 0.0], [0.05, 0.0], [0.05, 0.0]],
    ),
    "all_zero_groups_start_at_min_step": (
        dict(grad_norm_threshold=5.0, weight_decay_factor=2.0, min_weight_decay_step=1e-3),
        ({"lr": LR, "weight_decay": 0.0},),
        [6.0, 6.0, 6.0, 6.0, 6.0],
        [[1e-3], [2e-3], [4e-3], [8e-3], [1e-2]],
    ),
    "min_step_dominates_tiny_decay": (
        dict(
            grad_norm_threshold=5.0,
            weight_decay_factor=1.5,
            min_weight_decay_step=1e-3,
            max_weight_decay_factor=None,
        ),
        ({"lr": LR, "weight_decay": 1e-4},),
        [6.0, 6.0, 6.0],
        [[1.1e-3], [2.1e-3], [3.15e-3]],
    ),
    "selected_group_only": (
        dict(grad_norm_threshold=5.0, weight_decay_factor=2.0, groups=["b"]),
        ({"lr": LR, "weight_decay": 0.01, "name": "a"}, {"lr": LR, "weight_decay": 0.03, "name": "b"}),
        [6.0, 6.0],
        [[0.01, 0.06], [0.01, 0.12]],
    ),
    "off_by_default": (dict(), TWO_GROUPS, [100.0, 100.0], [[0.01, 0.0], [0.01, 0.0]]),
}


@pytest.mark.parametrize("case", WD_CASES, ids=list(WD_CASES))
@pytest.mark.parametrize("cls", [PlateauMetaOptimizer, AdvancedPlateauMetaOptimizer])
def test_grad_norm_raises_weight_decay(cls, case):
    kwargs, groups, grad_norms, expected = WD_CASES[case]
    model, opt = build(cls(patience=100, **kwargs), groups=groups)
    lrs, wds = run(model, opt, [{"loss": 1.0, "grad_norm": g} for g in grad_norms])
    assert wds == [approx(row) for row in expected]
    assert lrs == [[g["lr"] for g in groups]] * len(grad_norms)  # no lr cut with patience=100
    for d in opt.decisions:
        assert d.hparam == "weight_decay" and "grad_norm" in d.reason and "grad_norm_threshold" in d.reason


def test_weight_decay_with_adamw_and_tensor_grad_norm():
    model, opt = build(PlateauMetaOptimizer(grad_norm_threshold=0.5), optimizer=torch.optim.AdamW)
    run(model, opt, [{"loss": torch.tensor(1.0), "grad_norm": torch.tensor(0.7)}])
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.015)


# ----------------------------------------------------------------------------- warmup
WARMUP_CASES = {
    # name: (kwargs, losses, expected lr per step, steps of the logged decisions)
    # grid of regular decisions: steps 2, 5, 8, ...; warmup ends at step 4 (lr back to initial)
    # and the first regular decision is step 5; the loss rises during warmup, yet no cut.
    "grid_after_warmup": (
        dict(update_frequency=3, warmup_steps=4),
        [1, 2, 3, 4, 5, 5, 5, 6, 6, 6, 7],
        [0.02, 0.04, 0.06, 0.08, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05],
        [0, 1, 2, 3, 4, 8],
    ),
    # warmup ends on a grid step (5): that decision starts from the initial lr
    "warmup_end_on_grid": (
        dict(update_frequency=3, warmup_steps=5, patience=0),
        [1, 1, 1, 1, 1, 2, 2, 2, 3],
        [0.02, 0.036, 0.052, 0.068, 0.084, 0.1, 0.1, 0.1, 0.05],
        [0, 1, 2, 3, 4, 5, 8],
    ),
    "every_step": (
        dict(update_frequency=1, warmup_steps=2),
        [1, 1, 1, 2, 3],
        [0.02, 0.06, 0.1, 0.05, 0.05],
        [0, 1, 2, 3],
    ),
}


@pytest.mark.parametrize("case", WARMUP_CASES, ids=list(WARMUP_CASES))
def test_warmup_ramp_then_regular_decisions(case):
    kwargs, values, expected, steps = WARMUP_CASES[case]
    kwargs = dict(dict(patience=0, lr_factor=0.5, warmup_start_factor=0.2, trend_window=2), **kwargs)
    model, opt = build(AdvancedPlateauMetaOptimizer(**kwargs))
    lrs, _ = run(model, opt, losses(*values))
    assert column(lrs) == approx(expected)
    assert [d.step for d in opt.decisions] == steps
    assert opt.decisions[0].reason.startswith(f"warmup: step 0/{kwargs['warmup_steps']}")
    assert opt.decisions[-1].reason.startswith("plateau (no_improvement+trend)")


def test_warmup_steps_need_no_metric_but_regular_decisions_do():
    meta = AdvancedPlateauMetaOptimizer(warmup_steps=3, warmup_start_factor=0.1, update_frequency=4, monitor="val_loss")
    model, opt = build(meta)
    lrs, _ = run(model, opt, [{"loss": 1.0}] * 3 + [{"loss": 1.0, "val_loss": 2.0}])
    assert column(lrs) == approx([0.01, 0.04, 0.07, 0.1])
    run(model, opt, [{"loss": 1.0}] * 3, steps=[4, 5, 6])  # not decision steps
    with pytest.raises(KeyError, match="needs metric 'val_loss'"):
        opt.update_hyperparameters({"loss": 1.0}, step=7)


def test_default_warmup_is_a_grace_period_that_touches_no_lr():
    # warmup_start_factor=1 (default): before warmup_steps the lr is left alone (an attached
    # schedule keeps its values), only grid steps read metrics, and a missing metric at the first
    # real decision raises without ending the grace period.
    meta = AdvancedPlateauMetaOptimizer(warmup_steps=5, update_frequency=2, patience=0, lr_factor=0.5, trend_window=2,
                                        monitor="val_loss")
    assert [s for s in range(8) if meta.should_update(s)] == [1, 3, 5, 7]
    model, opt = build(meta)
    lrs, _ = run(model, opt, [{"val_loss": 1.0 + s} for s in range(4)] + [{"loss": 1.0}])  # rising, no cut
    assert column(lrs) == approx([0.1] * 5) and opt.decisions == []
    with pytest.raises(KeyError, match="needs metric 'val_loss'"):
        opt.update_hyperparameters({"loss": 1.0}, step=5)
    assert meta.warmup_done is False
    run(model, opt, [{"val_loss": 3.0}, {"val_loss": 3.0}, {"val_loss": 4.0}], steps=[5, 6, 7])
    assert meta.warmup_done is True
    assert [d.step for d in opt.decisions] == [7] and opt.param_groups[0]["lr"] == approx(0.05)


def test_warmup_respects_group_lrs_selection_and_bounds():
    meta = AdvancedPlateauMetaOptimizer(
        warmup_steps=2,
        warmup_start_factor=0.0,
        min_lr={"body": 0.02, "default": 0.0},
        groups=["body", "head"],
    )
    groups = TWO_GROUPS + ({"lr": 0.5, "weight_decay": 0.0, "name": "frozen"},)
    model, opt = build(meta, groups=groups)
    lrs, _ = run(model, opt, losses(1.0, 1.0, 1.0))
    assert lrs == [approx([0.02, 0.0, 0.5]), approx([0.05, 0.005, 0.5]), approx([0.1, 0.01, 0.5])]


def test_warmup_matches_torch_linear_lr():
    meta = AdvancedPlateauMetaOptimizer(warmup_steps=10, warmup_start_factor=1 / 3, patience=100)
    model, opt = build(meta)
    lrs, _ = run(model, opt, losses(*[1.0] * 12))
    ref_opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LinearLR(ref_opt, start_factor=1 / 3, total_iters=10)
    expected = []
    for _ in range(12):
        expected.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        sched.step()
    assert column(lrs) == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- trend / rel change
ADV_CASES = {
    # name: (kwargs, losses, expected lr multipliers, criteria names in the reason of the first cut)
    # The best value (an early 0.5) stalls while the loss keeps falling: "all" waits for the
    # trend to agree, so no cut; the plain rule would cut at decision 5.
    "all_needs_trend_to_agree": (
        dict(patience=3, lr_factor=0.5, trend_window=3, criteria="all"),
        [1.0, 0.5, 0.95, 0.9, 0.85, 0.8, 0.75],
        [1, 1, 1, 1, 1, 1, 1],
        None,
    ),
    "any_cuts_on_rising_window": (
        dict(patience=3, lr_factor=0.5, trend_window=3, criteria="any"),
        [1.0, 0.5, 0.95, 0.9, 0.85, 0.8, 0.75],
        [1, 1, 1, 0.5, 0.5, 0.5, 0.5],
        "plateau (trend)",
    ),
    "rising_loss_trend_only": (
        dict(patience=100, lr_factor=0.5, trend_window=3, criteria="any"),
        [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6],
        [1, 1, 0.5, 0.5, 0.5, 0.25, 0.25],
        "plateau (trend)",
    ),
    "trend_threshold_counts_slow_fall_as_flat": (
        dict(patience=100, lr_factor=0.5, trend_window=3, criteria="any", trend_threshold=0.05),
        [1.0, 0.99, 0.98, 0.97, 0.8, 0.6, 0.4],
        [1, 1, 0.5, 0.5, 0.5, 0.5, 0.5],
        "plateau (trend)",
    ),
    "rel_change": (
        dict(patience=100, lr_factor=0.5, trend_window=2, criteria="any", rel_change_threshold=0.05),
        [1.0, 0.9, 0.8, 0.79, 0.785, 0.78, 0.775],
        [1, 1, 1, 1, 1, 0.5, 0.5],
        "plateau (rel_change)",
    ),
    "all_three_criteria": (
        dict(patience=1, lr_factor=0.5, trend_window=2, criteria="all", rel_change_threshold=0.05),
        [1.0, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8],
        [1, 1, 1, 1, 1, 0.5, 0.5],
        "plateau (no_improvement+trend+rel_change)",
    ),
    "cooldown_blocks_trend_cuts": (
        dict(patience=100, lr_factor=0.5, trend_window=2, criteria="any", cooldown=3),
        [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
        [1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25],
        "plateau (trend)",
    ),
}


@pytest.mark.parametrize("case", ADV_CASES, ids=list(ADV_CASES))
def test_advanced_plateau_criteria(case):
    kwargs, values, expected, reason = ADV_CASES[case]
    model, opt = build(AdvancedPlateauMetaOptimizer(**kwargs))
    lrs, _ = run(model, opt, losses(*values))
    assert column(lrs) == approx([LR * m for m in expected])
    cuts = [d for d in opt.decisions if d.hparam == "lr"]
    if reason is None:
        assert cuts == []
    else:
        assert cuts[0].reason.startswith(reason)


def test_plain_plateau_cuts_where_all_criteria_waits():
    kwargs, values, _, _ = ADV_CASES["all_needs_trend_to_agree"]
    model, opt = build(PlateauMetaOptimizer(patience=3, lr_factor=0.5))
    lrs, _ = run(model, opt, losses(*values))
    assert column(lrs) == approx([LR * m for m in [1, 1, 1, 1, 1, 0.5, 0.5]])


@pytest.mark.parametrize(
    "values, expected",
    [
        ([4.0, 3.0, 2.0], -1 / 3),
        ([1.0, 1.0, 1.0], 0.0),
        ([2.0], 0.0),
        ([0.0, 0.0], 0.0),
        ([1e308, 1e308, 1e308], 0.0),
    ],
)
def test_relative_slope(values, expected):
    assert relative_slope(values) == pytest.approx(expected, abs=1e-15)
    assert relative_slope([v * 1e-300 for v in values]) == pytest.approx(expected, abs=1e-15)


def test_slope_is_overflow_safe():
    assert slope([1.0, 3.0, 5.0]) == pytest.approx(2.0)
    assert slope([1e307, 5e307, 9e307]) == pytest.approx(4e307)


# ----------------------------------------------------------------------------- overfitting
GAP_ROWS = [{"loss": 1.0 - 0.1 * i, "val_loss": 1.0} for i in range(6)]

OVERFIT_CASES = {
    # name: (kwargs, rows, expected lr multipliers, expected wd)
    "gap_raises_weight_decay": (
        dict(overfit_action="weight_decay"),
        GAP_ROWS,
        [1] * 6,
        [0.01, 0.01, 0.02, 0.02, 0.02, 0.04],
    ),
    "gap_cuts_lr": (dict(overfit_action="lr"), GAP_ROWS, [1, 1, 0.5, 0.5, 0.5, 0.25], [0.01] * 6),
    "gap_both": (
        dict(overfit_action="both"),
        GAP_ROWS,
        [1, 1, 0.5, 0.5, 0.5, 0.25],
        [0.01, 0.01, 0.02, 0.02, 0.02, 0.04],
    ),
    "constant_gap_is_fine": (
        dict(),
        [{"loss": 1.0 - 0.1 * i, "val_loss": 1.1 - 0.1 * i} for i in range(6)],
        [1] * 6,
        [0.01] * 6,
    ),
    "no_val_loss_no_gap": (dict(), [{"loss": 1.0 - 0.1 * i} for i in range(6)], [1] * 6, [0.01] * 6),
    "gap_monitoring_off": (dict(gap_threshold=None), GAP_ROWS, [1] * 6, [0.01] * 6),
    "weight_norm_growth": (
        dict(gap_threshold=None, weight_norm_threshold=0.05),
        [
            {"loss": 1.0 - 0.05 * i, "weight_norm": w}
            for i, w in enumerate([10, 11, 12, 12.1, 12.2, 12.3, 13, 14, 15])
        ],
        [1] * 9,
        [0.01, 0.01, 0.02, 0.02, 0.02, 0.02, 0.02, 0.04, 0.04],
    ),
}


@pytest.mark.parametrize("case", OVERFIT_CASES, ids=list(OVERFIT_CASES))
def test_overfitting_monitoring(case):
    kwargs, rows, lr_mult, expected_wd = OVERFIT_CASES[case]
    meta = AdvancedPlateauMetaOptimizer(
        patience=100, lr_factor=0.5, trend_window=3, weight_decay_factor=2.0, **kwargs
    )
    model, opt = build(meta)
    lrs, wds = run(model, opt, rows)
    assert column(lrs) == approx([LR * m for m in lr_mult])
    assert column(wds) == approx(expected_wd)
    assert all(d.reason.startswith("overfitting:") for d in opt.decisions)


def test_weight_decay_raised_once_per_decision_with_every_trigger_named():
    meta = AdvancedPlateauMetaOptimizer(
        patience=100, trend_window=3, weight_decay_factor=2.0, grad_norm_threshold=1.0
    )
    model, opt = build(meta)
    rows = [dict(r, grad_norm=0.5 if i < 2 else 3.0) for i, r in enumerate(GAP_ROWS[:3])]
    _, wds = run(model, opt, rows)
    assert column(wds) == approx([0.01, 0.01, 0.02])
    (decision,) = opt.decisions
    assert "grad_norm 3" in decision.reason and "train/val gap widening" in decision.reason


# ----------------------------------------------------------------------------- frequency
FREQUENCY_CASES = {
    # decide every 3 steps on the last value: 1.0, 0.9, 0.8, 0.7 all improve
    "last": ("last", [1, 1, 1, 2, 2, 0.9, 2, 2, 0.8, 2, 2, 0.7], [1] * 12),
    # on the mean since the last decision: 1.0, 1.633, 1.6, 1.567 -> stall, cut at step 8
    "mean": ("mean", [1, 1, 1, 2, 2, 0.9, 2, 2, 0.8, 2, 2, 0.7], [1] * 8 + [0.5] * 4),
}


@pytest.mark.parametrize("case", FREQUENCY_CASES, ids=list(FREQUENCY_CASES))
def test_update_frequency_counts_decisions(case):
    reduction, values, expected = FREQUENCY_CASES[case]
    meta = PlateauMetaOptimizer(patience=1, lr_factor=0.5, update_frequency=3)
    model, opt = build(meta, metric_reduction=reduction)
    lrs, _ = run(model, opt, losses(*values))
    assert column(lrs) == approx([LR * m for m in expected])
    assert [d.step for d in opt.decisions] == ([8] if reduction == "mean" else [])


def test_update_frequency_with_explicit_steps():
    meta = PlateauMetaOptimizer(patience=0, lr_factor=0.5, update_frequency=10)
    model, opt = build(meta)
    lrs, _ = run(model, opt, losses(1.0, 1.0, 1.0, 1.0), steps=[0, 9, 15, 19])
    assert column(lrs) == approx([0.1, 0.1, 0.1, 0.05])  # decisions at steps 9 and 19


@pytest.mark.parametrize("cls", [PlateauMetaOptimizer, AdvancedPlateauMetaOptimizer])
def test_adaptive_frequency_lengthens_interval_on_plateau(cls):
    extra = dict(criteria="any", trend_window=100) if cls is AdvancedPlateauMetaOptimizer else {}
    meta = cls(
        patience=1,
        lr_factor=0.5,
        update_frequency=2,
        adaptive_frequency=AdaptiveFrequency(min_interval=1, max_interval=8),
        **extra,
    )
    model, opt = build(meta)
    lrs, _ = run(model, opt, losses(*[1.0] * 24))
    # decisions at steps 1, 3, 7, 15, 23 (interval 2 -> 4 -> 8 -> 8); cuts at the 3rd and 5th
    assert column(lrs) == approx([0.1] * 7 + [0.05] * 16 + [0.025])
    assert [d.step for d in opt.decisions] == [7, 23]
    assert meta.interval == 8 and meta.next_update_step == 31


def test_adaptive_frequency_shortens_interval_while_loss_falls_fast():
    meta = PlateauMetaOptimizer(
        patience=0, update_frequency=8, adaptive_frequency=AdaptiveFrequency(min_interval=2, max_interval=8)
    )
    model, opt = build(meta)
    run(model, opt, losses(*[0.5**i for i in range(20)]))
    assert meta.interval == 2 and opt.decisions == []  # falling loss: no cut, frequent decisions


# ----------------------------------------------------------------------------- torch parity
TORCH_SETTINGS = [
    dict(patience=3, factor=0.5),
    dict(patience=2, factor=0.3, cooldown=3, threshold=0.01),
    dict(patience=0, factor=0.5, cooldown=1, threshold=0.001, threshold_mode="abs", min_lr=1e-3),
    dict(patience=4, factor=0.1, mode="max"),
    dict(patience=1, factor=0.5, min_lr=[1e-3, 1e-4]),
]


@pytest.mark.parametrize("settings_", TORCH_SETTINGS, ids=[str(s) for s in TORCH_SETTINGS])
def test_same_cuts_as_torch_reduce_lr_on_plateau(settings_):
    rng = random.Random(0)
    values = [1.0 / (1 + 0.1 * i) + rng.random() * 0.05 for i in range(300)]
    if settings_.get("mode") == "max":
        values = [2 - v for v in values]
    groups = ({"lr": 0.1}, {"lr": 0.05})
    torch.manual_seed(0)
    ref_model = Sum(2)
    ref_opt = torch.optim.SGD(
        [dict(g, params=ref_model.parts[i].parameters()) for i, g in enumerate(groups)], lr=LR
    )
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, **settings_)
    kw = dict(settings_)
    meta = PlateauMetaOptimizer(lr_factor=kw.pop("factor"), **kw)
    model, opt = build(meta, groups=groups)
    expected = []
    for v in values:
        sched.step(v)
        expected.append([g["lr"] for g in ref_opt.param_groups])
    lrs, _ = run(model, opt, losses(*values))
    assert lrs == expected  # exact, every step, every group
    assert len(opt.decisions) >= 4


# ----------------------------------------------------------------------------- resume
def _train(meta_factory, steps, ckpt=None, resume_at=None, tmp_path=None):
    """Real training with tensor metrics, val_loss every 4 steps, weight_norm and grad_norm.

    With ``resume_at``, checkpoint there through torch.save/torch.load(weights_only=True) and
    continue with brand-new model, optimizer and meta-optimizer objects.
    """
    torch.manual_seed(1)
    data_x = torch.randn(256, 6)
    data_y = (data_x @ torch.randn(6, 1)).tanh() + 0.3 * torch.randn(256, 1)
    val_x, val_y = data_x[:64], data_y[:64]

    def fresh():
        torch.manual_seed(2)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        groups = [
            {"params": model[0].parameters(), "lr": 0.05, "weight_decay": 0.01, "name": "body"},
            {"params": model[2].parameters(), "lr": 0.02, "weight_decay": 0.0, "name": "head"},
        ]
        return model, OptimizerWrapper(
            torch.optim.SGD(groups, momentum=0.9), meta_factory(), metric_reduction="mean"
        )

    model, opt = fresh()
    trace = []
    for step in range(steps):
        if step == resume_at:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
            state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
            model, opt = fresh()
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
        idx = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(data_x[idx]), data_y[idx])
        loss.backward()
        metrics = {
            "loss": loss.detach(),
            "grad_norm": torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0),
            "weight_norm": torch.linalg.vector_norm(
                torch.cat([p.detach().flatten() for p in model.parameters()])
            ),
        }
        if step % 4 == 3:
            with torch.no_grad():
                metrics["val_loss"] = torch.nn.functional.mse_loss(model(val_x), val_y).item()
        opt.update_hyperparameters(metrics)
        opt.step()
        trace.append([(g["lr"], g["weight_decay"]) for g in opt.param_groups])
    params = [p.detach().clone() for p in model.parameters()]
    return trace, [d.to_dict() for d in opt.decisions], params, opt.meta_optimizer.state_dict()


RESUME_FACTORIES = {
    "plateau": lambda: PlateauMetaOptimizer(
        patience=2,
        lr_factor=0.5,
        cooldown=1,
        grad_norm_threshold=0.9,
        update_frequency=4,
        max_weight_decay=0.05,
    ),
    "advanced": lambda: AdvancedPlateauMetaOptimizer(
        patience=2,
        lr_factor=0.5,
        grad_norm_threshold=0.9,
        weight_decay_factor=1.5,
        warmup_steps=10,
        trend_window=3,
        update_frequency=4,
        criteria="any",
        rel_change_threshold=0.01,
        weight_norm_threshold=0.001,
        overfit_action="both",
        gap_threshold=0.0,
        adaptive_frequency=AdaptiveFrequency(min_interval=2, max_interval=8),
    ),
}


@pytest.mark.parametrize("resume_at", [6, 23, 37])
@pytest.mark.parametrize("name", RESUME_FACTORIES, ids=list(RESUME_FACTORIES))
def test_resume_is_bit_exact(name, resume_at, tmp_path):
    factory = RESUME_FACTORIES[name]
    trace, decisions, params, meta_state = _train(factory, 80)
    kinds = {d["hparam"] for d in decisions}
    assert kinds == {"lr", "weight_decay"}, decisions  # the run exercises both kinds of change
    trace2, decisions2, params2, meta_state2 = _train(factory, 80, resume_at=resume_at, tmp_path=tmp_path)
    assert trace2 == trace
    assert decisions2 == decisions
    assert meta_state2 == meta_state
    assert all(torch.equal(a, b) for a, b in zip(params, params2))


# ----------------------------------------------------------------------------- reset, state
@pytest.mark.parametrize("cls", [PlateauMetaOptimizer, AdvancedPlateauMetaOptimizer])
def test_reset_forgets_everything(cls):
    kwargs = dict(patience=0, lr_factor=0.5, cooldown=2)
    if cls is AdvancedPlateauMetaOptimizer:
        kwargs["criteria"] = "any"
    meta = cls(**kwargs)
    fresh_state = cls(**kwargs).state_dict()
    model, opt = build(meta)
    run(model, opt, losses(1.0, 1.0, 0.5))
    assert meta.state_dict() != fresh_state
    assert meta.num_cuts == 1 and meta.cooldown_counter > 0
    meta.reset()
    assert meta.state_dict() == fresh_state
    # after reset the best value is forgotten: 2.0 is a new best, not a bad decision
    lrs, _ = run(model, opt, losses(2.0), steps=[3])
    assert column(lrs) == approx([0.05])


def test_state_dict_is_plain_data_loadable_with_weights_only(tmp_path):
    meta = AdvancedPlateauMetaOptimizer(patience=1, trend_window=2, weight_norm_threshold=0.1)
    model, opt = build(meta)
    run(model, opt, [{"loss": 1.0, "val_loss": 1.2, "weight_norm": 3.0}] * 3)
    torch.save(meta.state_dict(), tmp_path / "meta.pt")
    loaded = torch.load(tmp_path / "meta.pt", weights_only=True)
    assert loaded == meta.state_dict()
    other = AdvancedPlateauMetaOptimizer(patience=1, trend_window=2, weight_norm_threshold=0.1)
    other.load_state_dict(loaded)
    assert other.state_dict() == meta.state_dict()
    with pytest.raises(ValueError, match="cannot load it into PlateauMetaOptimizer"):
        PlateauMetaOptimizer().load_state_dict(loaded)


# ----------------------------------------------------------------------------- bad input
BAD_ARGS = [
    (PlateauMetaOptimizer, dict(patience=-1), ValueError, "patience must be >= 0, got patience=-1"),
    (PlateauMetaOptimizer, dict(patience=2.5), TypeError, "patience must be an int, got patience=2.5"),
    (
        PlateauMetaOptimizer,
        dict(lr_factor=1.5),
        ValueError,
        r"lr_factor must be in \(0, 1\), got lr_factor=1.5",
    ),
    (PlateauMetaOptimizer, dict(lr_factor=0.0), ValueError, "got lr_factor=0.0"),
    (
        PlateauMetaOptimizer,
        dict(lr_factor="0.5"),
        TypeError,
        "lr_factor must be a real number, got lr_factor='0.5'",
    ),
    (PlateauMetaOptimizer, dict(threshold=-0.1), ValueError, "got threshold=-0.1"),
    (PlateauMetaOptimizer, dict(threshold_mode="relative"), ValueError, "threshold_mode must be one of"),
    (PlateauMetaOptimizer, dict(cooldown=-2), ValueError, "got cooldown=-2"),
    (PlateauMetaOptimizer, dict(mode="minimum"), ValueError, "mode must be one of .* got mode='minimum'"),
    (PlateauMetaOptimizer, dict(monitor=""), TypeError, "got monitor=''"),
    (PlateauMetaOptimizer, dict(monitor=3), TypeError, "got monitor=3"),
    (PlateauMetaOptimizer, dict(eps=-1.0), ValueError, "got eps=-1.0"),
    (PlateauMetaOptimizer, dict(grad_norm_threshold=-1.0), ValueError, "got grad_norm_threshold=-1.0"),
    (
        PlateauMetaOptimizer,
        dict(grad_norm_threshold=math.nan),
        ValueError,
        "grad_norm_threshold must not be NaN",
    ),
    (PlateauMetaOptimizer, dict(weight_decay_factor=1.0), ValueError, "got weight_decay_factor=1.0"),
    (PlateauMetaOptimizer, dict(weight_decay_factor=0.5), ValueError, "got weight_decay_factor=0.5"),
    (PlateauMetaOptimizer, dict(min_weight_decay_step=-1e-3), ValueError, "got min_weight_decay_step=-0.001"),
    (PlateauMetaOptimizer, dict(max_weight_decay_factor=0.5), ValueError, "got max_weight_decay_factor=0.5"),
    (PlateauMetaOptimizer, dict(groups=[]), TypeError, r"got groups=\[\]"),
    (PlateauMetaOptimizer, dict(groups=[1.5]), TypeError, r"got groups=\[1.5\]"),
    (PlateauMetaOptimizer, dict(groups=[-1]), ValueError, r"got groups=\[-1\]"),
    (
        PlateauMetaOptimizer,
        dict(update_frequency=0),
        ValueError,
        "update_frequency must be >= 1, got update_frequency=0",
    ),
    (PlateauMetaOptimizer, dict(min_lr=-1.0), ValueError, "got min_lr=-1.0"),
    (PlateauMetaOptimizer, dict(max_weight_decay={"head": -1}), ValueError, "max_weight_decay"),
    (AdvancedPlateauMetaOptimizer, dict(warmup_steps=-5), ValueError, "got warmup_steps=-5"),
    (AdvancedPlateauMetaOptimizer, dict(warmup_start_factor=1.5), ValueError, "got warmup_start_factor=1.5"),
    (
        AdvancedPlateauMetaOptimizer,
        dict(trend_window=1),
        ValueError,
        "trend_window must be >= 2, got trend_window=1",
    ),
    (AdvancedPlateauMetaOptimizer, dict(trend_threshold=-0.1), ValueError, "got trend_threshold=-0.1"),
    (
        AdvancedPlateauMetaOptimizer,
        dict(rel_change_threshold=-1.0),
        ValueError,
        "got rel_change_threshold=-1.0",
    ),
    (
        AdvancedPlateauMetaOptimizer,
        dict(criteria="most"),
        ValueError,
        "criteria must be one of .* got criteria='most'",
    ),
    (AdvancedPlateauMetaOptimizer, dict(gap_threshold=-0.1), ValueError, "got gap_threshold=-0.1"),
    (AdvancedPlateauMetaOptimizer, dict(overfit_action="stop"), ValueError, "got overfit_action='stop'"),
    (
        AdvancedPlateauMetaOptimizer,
        dict(weight_norm_threshold=-1),
        ValueError,
        "got weight_norm_threshold=-1",
    ),
    (AdvancedPlateauMetaOptimizer, dict(lr_factor=2.0), ValueError, "got lr_factor=2.0"),
]


@pytest.mark.parametrize(
    "cls, kwargs, error, match", BAD_ARGS, ids=[f"{c.func.__name__}-{k}" for c, k, _, _ in BAD_ARGS]
)
def test_bad_arguments(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


def test_seed_examples_construct():
    meta = PlateauMetaOptimizer(patience=3, lr_factor=0.5)
    assert (meta.patience, meta.lr_factor, meta.update_frequency) == (3, 0.5, 1)
    adv = AdvancedPlateauMetaOptimizer(
        patience=3,
        lr_factor=0.5,
        grad_norm_threshold=10.0,
        weight_decay_factor=1.5,
        warmup_steps=50,
        trend_window=5,
    )
    assert (adv.grad_norm_threshold, adv.weight_decay_factor, adv.warmup_steps, adv.trend_window) == (
        10.0,
        1.5,
        50,
        5,
    )
    assert "warmup_steps=50" in repr(adv)


@pytest.mark.parametrize(
    "meta, metrics, missing",
    [
        (PlateauMetaOptimizer(monitor="val_loss"), {"loss": 1.0, "lr": 0.1}, "val_loss"),
        (PlateauMetaOptimizer(grad_norm_threshold=1.0), {"loss": 1.0}, "grad_norm"),
        (AdvancedPlateauMetaOptimizer(weight_norm_threshold=0.1), {"loss": 1.0}, "weight_norm"),
    ],
)
def test_missing_metric_raises_naming_it(meta, metrics, missing):
    model, opt = build(meta)
    before = meta.state_dict()
    with pytest.raises(KeyError, match=rf"needs metric '{missing}'.*were \[.*'loss'"):
        opt.update_hyperparameters(metrics)
    assert meta.state_dict() == before  # nothing half-updated


@pytest.mark.parametrize("cls", [PlateauMetaOptimizer, AdvancedPlateauMetaOptimizer])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_metrics_are_skipped_and_logged(cls, bad):
    extra = {"trend_window": 2} if cls is AdvancedPlateauMetaOptimizer else {}
    meta = cls(patience=0, lr_factor=0.5, grad_norm_threshold=5.0, **extra)
    model, opt = build(meta)
    rows = [
        {"loss": 1.0, "grad_norm": 1.0},
        {"loss": bad, "grad_norm": 1.0},
        {"loss": torch.tensor(bad), "grad_norm": 1.0},
        {"loss": 0.5, "grad_norm": torch.tensor(bad)},
        {"loss": 1.0, "grad_norm": 1.0},
    ]
    lrs, wds = run(model, opt, rows)
    # skipped decisions change nothing: the 1.0 at step 4 is the second value seen, a stall
    # (and a flat trend over [1.0, 1.0] for the advanced strategy)
    expected = [1, 1, 1, 1, 0.5]
    assert column(lrs) == approx([LR * m for m in expected])
    assert column(wds) == approx([0.01] * 5)
    assert [s.step for s in opt.log.skipped] == [1, 2, 3]
    assert all("non-finite metric" in s.reason for s in opt.log.skipped)


# ----------------------------------------------------------------------------- properties
metric_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e300, max_value=1e300),
    st.floats(min_value=0, max_value=1e-300),
    st.sampled_from([0.0, 1.0, 1e308, -1e308, 5e-324]),
)
metric_rows = st.fixed_dictionaries(
    {"loss": metric_values, "grad_norm": metric_values, "weight_norm": metric_values},
    optional={"val_loss": metric_values},
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(metric_rows, min_size=1, max_size=40),
    advanced=st.booleans(),
    criteria=st.sampled_from(["all", "any"]),
    min_lr=st.sampled_from([0.0, 1e-3]),
    max_lr=st.sampled_from([None, 0.2]),
    max_wd=st.sampled_from([None, 0.05]),
    factor=st.sampled_from([0.1, 0.5, 0.999]),
)
def test_lrs_and_weight_decays_stay_finite_and_bounded(
    rows, advanced, criteria, min_lr, max_lr, max_wd, factor
):
    common = dict(
        patience=1,
        lr_factor=factor,
        grad_norm_threshold=1.0,
        weight_decay_factor=3.0,
        min_lr=min_lr,
        max_lr=max_lr,
        max_weight_decay=max_wd,
        max_weight_decay_factor=None,
    )
    if advanced:
        meta = AdvancedPlateauMetaOptimizer(
            **common,
            warmup_steps=3,
            trend_window=2,
            criteria=criteria,
            rel_change_threshold=0.01,
            weight_norm_threshold=0.0,
            gap_threshold=0.0,
            overfit_action="both",
        )
    else:
        meta = PlateauMetaOptimizer(**common)
    groups = ({"lr": 0.1, "weight_decay": 0.01, "name": "a"}, {"lr": 0.01, "weight_decay": 0.0, "name": "b"})
    torch.manual_seed(0)
    model = Sum(2)
    opt = OptimizerWrapper(
        torch.optim.SGD([dict(g, params=model.parts[i].parameters()) for i, g in enumerate(groups)]), meta
    )
    for row in rows:
        opt.update_hyperparameters(row)
        for g in opt.param_groups:
            assert math.isfinite(g["lr"]) and math.isfinite(g["weight_decay"])
            assert min_lr <= g["lr"] <= (max_lr if max_lr is not None else 0.1)
            assert 0.0 <= g["weight_decay"] <= (max_wd if max_wd is not None else math.inf)
        assert opt.param_groups[1]["weight_decay"] == 0.0  # the no-decay group stays at 0
    assert all(math.isfinite(d.new) for d in opt.decisions)


# ----------------------------------------------------------------------------- noise-aware rule
NOISY_CLASSES = [plateau.PlateauMetaOptimizer, plateau.AdvancedPlateauMetaOptimizer]


def _noisy_stream(level, steps, sigma, seed):
    rng = random.Random(seed)
    return [level(t) * (1.0 + sigma * rng.gauss(0.0, 1.0)) for t in range(steps)]


def _cut_steps(meta, values):
    model, opt = build(meta)
    run(model, opt, losses(*values))
    return [d.step for d in opt.decisions if d.hparam == "lr" and d.new < d.old]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cls", NOISY_CLASSES, ids=lambda c: c.__name__)
def test_noisy_decreasing_loss_is_never_cut(cls, seed):
    # A minibatch loss falling from 1.0 to 0.55 over 400 steps, with 10% noise on every value:
    # the seed's call (patience=3, a decision every step on "loss") must not cut it.
    values = _noisy_stream(lambda t: 1.0 - 0.45 * t / 400, 400, 0.1, seed)
    meta = cls(patience=3, lr_factor=0.5)
    assert meta.noise_aware  # "loss" is a per-step minibatch metric: noise-aware by default
    assert _cut_steps(meta, values) == []
    # torch's strict rule on the same stream cuts again and again (what users saw).
    assert len(_cut_steps(cls(patience=3, lr_factor=0.5, noise_aware=False), values)) >= 10


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cls", NOISY_CLASSES, ids=lambda c: c.__name__)
def test_noisy_flat_loss_is_cut_after_patience(cls, seed):
    values = _noisy_stream(lambda t: 1.0, 400, 0.2, seed)
    meta = cls(patience=3, lr_factor=0.5, trend_window=5) if cls is NOISY_CLASSES[1] else cls(3, 0.5)
    cuts = _cut_steps(meta, values)
    assert len(cuts) >= 2, cuts
    # No cut before 2 * window values plus patience + 1 bad decisions; each cut restarts the count.
    assert meta.window == 60
    assert cuts[0] >= 2 * meta.window - 1 + meta.patience + 1
    assert all(b - a >= 2 * meta.window + meta.patience for a, b in zip(cuts, cuts[1:])), cuts


def test_noise_aware_counts_nothing_before_the_window_is_full():
    meta = plateau.PlateauMetaOptimizer(patience=0, lr_factor=0.5, window=5)
    # a rising loss: strict patience=0 would cut at the 2nd decision; noise-aware waits for
    # 2 * window = 10 values (the 10th only sets the best), then cuts at the first bad decision.
    cuts = _cut_steps(meta, [float(v) for v in range(1, 13)])
    assert cuts == [10]
    assert meta.recent == [12.0] and meta.num_cuts == 1


@pytest.mark.parametrize(
    "monitor, expected", [("loss", True), ("train_loss", True), ("val_loss", False), ("eval_loss", False)]
)
def test_noise_aware_auto_follows_the_monitor(monitor, expected):
    assert plateau.PlateauMetaOptimizer(monitor=monitor).noise_aware is expected
    assert plateau.AdvancedPlateauMetaOptimizer(monitor=monitor).noise_aware is expected
    assert plateau.PlateauMetaOptimizer(monitor=monitor, noise_aware=not expected).noise_aware is not expected


def test_trainable_defaults_keep_the_strict_rule():
    # The provided trainable decides at evaluations on val_loss: exact values, torch's rule.
    from ray_metaopt.training.builders import build_meta_optimizer, trial_meta_defaults

    for name, cls in (("plateau", plateau.PlateauMetaOptimizer), ("advanced_plateau", NOISY_CLASSES[1])):
        meta = build_meta_optimizer(name, {}, defaults=trial_meta_defaults(name, 20))
        assert type(meta) is cls and meta.noise_aware is False and meta.monitor == "val_loss"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"noise_aware": "yes"}, TypeError, "noise_aware='yes'"),
        ({"noise_aware": 1}, TypeError, "noise_aware=1"),
        ({"window": 1}, ValueError, "window"),
        ({"window": 2.5}, TypeError, "window"),
        ({"noise_k": -1.0}, ValueError, "noise_k"),
        ({"noise_k": math.nan}, ValueError, "noise_k"),
    ],
)
@pytest.mark.parametrize("cls", NOISY_CLASSES, ids=lambda c: c.__name__)
def test_noise_aware_arguments_are_validated(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


def test_noise_aware_grad_norm_rule_needs_a_sustained_rise():
    meta = plateau.PlateauMetaOptimizer(patience=1000, grad_norm_threshold=1.0, window=5)
    model, opt = build(meta)
    spikes = [{"loss": 1.0, "grad_norm": g} for g in (0.1, 50.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1)]
    run(model, opt, spikes)
    assert [d for d in opt.decisions if d.hparam == "weight_decay"] == []  # one spike: no change
    run(model, opt, [{"loss": 1.0, "grad_norm": 2.0}] * 4)
    # steps 6..10 hold 0.1, 0.1, 2, 2, 2: the median is above the threshold at step 10
    assert [d.step for d in opt.decisions if d.hparam == "weight_decay"] == [10]


@pytest.mark.parametrize("resume_at", [70, 131])
@pytest.mark.parametrize("cls", NOISY_CLASSES, ids=lambda c: c.__name__)
def test_noise_aware_resume_is_bit_exact(cls, resume_at, tmp_path):
    values = _noisy_stream(lambda t: 1.0, 220, 0.2, 3)
    factory = lambda: cls(patience=3, lr_factor=0.5, window=20, grad_norm_threshold=0.5)  # noqa: E731
    rows = [{"loss": v, "grad_norm": 1.0 if i % 50 < 25 else 0.1} for i, v in enumerate(values)]
    model, opt = build(factory())
    lrs, wds = run(model, opt, rows)
    assert any(d.hparam == "lr" for d in opt.decisions)
    model2, opt2 = build(factory())
    run(model2, opt2, rows[:resume_at])
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    model3, opt3 = build(factory())
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    lrs3, wds3 = run(model3, opt3, rows[resume_at:], steps=list(range(resume_at, len(rows))))
    assert lrs3 == lrs[resume_at:] and wds3 == wds[resume_at:]
    assert opt3.meta_optimizer.state_dict() == opt.meta_optimizer.state_dict()


# ----------------------------------------------------------------------------- threshold=0 (issue 17)
@pytest.mark.parametrize("threshold_mode", ["rel", "abs"])
def test_threshold_zero_flat_loss_cuts_like_torch(threshold_mode):
    # An equal value is no improvement (strict `<`): a flat loss cuts after patience + 1 decisions.
    # With `<=` the best would be "improved" every decision and the lr would never drop.
    meta = PlateauMetaOptimizer(patience=1, lr_factor=0.5, threshold=0.0, threshold_mode=threshold_mode)
    model, opt = build(meta)
    lrs, _ = run(model, opt, losses(1.0, 1.0, 1.0, 1.0, 1.0))
    torch_opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        torch_opt, patience=1, factor=0.5, threshold=0.0, threshold_mode=threshold_mode
    )
    expected = []
    for _ in range(5):
        sched.step(1.0)
        expected.append(torch_opt.param_groups[0]["lr"])
    assert column(lrs) == approx(expected)
    assert column(lrs) == approx([LR, LR, LR / 2, LR / 2, LR / 4])
