"""MetaOptimizer base class: scheduling, validation of common arguments, properties of the applier."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core_strategies import LossTracker, ScaleEvery, two_group_model
from ray_metaopt import HParamUpdate, MetaOptimizer, OptimizerWrapper


def test_abstract_without_decide():
    class Incomplete(MetaOptimizer):
        pass

    with pytest.raises(TypeError):
        Incomplete()


@pytest.mark.parametrize("freq, due", [(1, [0, 1, 2, 3]), (2, [1, 3]), (4, [3])])
def test_should_update_follows_frequency(freq, due):
    meta = ScaleEvery(update_frequency=freq)
    decided = []
    for step in range(4):
        if meta.should_update(step):
            meta.update_hparams({"loss": 1.0}, step)
            decided.append(step)
    assert decided == due


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"update_frequency": 0}, ValueError, "update_frequency must be >= 1, got update_frequency=0"),
        ({"update_frequency": 2.0}, TypeError, "update_frequency must be an int, got update_frequency=2.0"),
        ({"min_lr": -1.0}, ValueError, r"min_lr must be in \[0, inf\], got min_lr=-1.0"),
        ({"max_lr": "big"}, TypeError, "max_lr must be a real number, got max_lr='big'"),
        ({"max_lr": [1.0, -2.0]}, ValueError, r"max_lr\[1\] must be in"),
        ({"max_weight_decay": {"head": float("nan")}}, ValueError, r"max_weight_decay\['head'\] must not be NaN"),
    ],
)
def test_common_argument_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        ScaleEvery(**kwargs)


def test_update_hparams_skips_non_finite_without_state_change():
    meta = LossTracker()
    assert meta.update_hparams({"loss": float("nan")}, 0) == []
    assert meta.last is None and meta.should_update(0)


def test_bounds_resolution_by_name_role_index():
    from ray_metaopt.base import GroupState

    meta = ScaleEvery(min_lr={"gate": 1e-4, "head": 1e-3, "default": 1e-6}, max_lr=[1.0, 2.0])
    gate = GroupState(0, "router", "gate", 0.1, 0.0, 0.1, 0.0, 10)
    head = GroupState(1, "head", "", 0.1, 0.0, 0.1, 0.0, 10)
    other = GroupState(2, "body", "", 0.1, 0.0, 0.1, 0.0, 10)
    assert meta.lr_bounds(gate) == (1e-4, 1.0)
    assert meta.lr_bounds(head) == (1e-3, 2.0)
    assert meta.lr_bounds(other) == (1e-6, math.inf)


class RandomWalk(MetaOptimizer):
    """Proposes arbitrary (possibly absurd) values: the applier must keep them safe."""

    def __init__(self, proposals, **kwargs):
        super().__init__(**kwargs)
        self.proposals = list(proposals)

    def decide(self, metrics, step, groups):
        value = self.proposals.pop(0) if self.proposals else metrics["loss"]
        return [HParamUpdate(g.index, h, value, "walk") for g in groups for h in ("lr", "weight_decay")]


metric_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e300, max_value=1e300),
    st.sampled_from([0.0, 1e-300, -0.0, float("nan"), float("inf")]),
)


@settings(max_examples=150, deadline=None)
@given(
    stream=st.lists(metric_values, min_size=1, max_size=30),
    proposals=st.lists(metric_values, max_size=30),
    as_tensor=st.booleans(),
)
def test_applier_keeps_hparams_finite_and_bounded(stream, proposals, as_tensor):
    model, groups = two_group_model()
    meta = RandomWalk(proposals, min_lr=1e-6, max_lr={"body": 0.1, "head": 1.0}, max_weight_decay=0.3)
    w = OptimizerWrapper(torch.optim.AdamW(groups), meta)
    for value in stream:
        w.update_hyperparameters({"loss": torch.tensor(value, dtype=torch.float64) if as_tensor else value})
        for g, high in zip(w.param_groups, (0.1, 1.0)):
            assert math.isfinite(g["lr"]) and 1e-6 <= g["lr"] <= high
            assert math.isfinite(g["weight_decay"]) and 0.0 <= g["weight_decay"] <= 0.3
    for d in w.decisions:
        assert math.isfinite(d.new)


# ---------------------------------------------------------------- issue 17: bounds and schedule
@pytest.mark.parametrize("kwargs", [{"min_lr": math.inf}, {"min_lr": [1e-4, math.inf]}, {"min_lr": {"head": math.inf}}])
def test_min_lr_must_be_finite(kwargs):
    # min_lr=inf was accepted and the clamp then wrote lr=inf.
    with pytest.raises(ValueError, match=r"min_lr.* must be finite, got min_lr.*=inf"):
        ScaleEvery(**kwargs)


def test_min_lr_above_max_lr_rejected_naming_both():
    with pytest.raises(ValueError, match=r"min_lr must be <= max_lr, got min_lr=1.0, max_lr=0.01"):
        ScaleEvery(min_lr=1.0, max_lr=0.01)


def test_min_lr_above_max_lr_per_group_rejected_at_wrapping():
    _, groups = two_group_model()
    meta = ScaleEvery(min_lr={"head": 0.5}, max_lr=0.1)
    with pytest.raises(ValueError, match=r"min_lr=0.5 > max_lr=0.1 for param group 1 \('head'\)"):
        OptimizerWrapper(torch.optim.SGD(groups, lr=0.1), meta)


def test_should_update_is_a_pure_question_per_step():
    # update_frequency=5, no decision made: steps 4 and 9 of 0..9 are due, no others, and asking
    # (twice) changes nothing. Before: every step from 4 on answered True.
    meta = ScaleEvery(update_frequency=5)
    assert [s for s in range(10) if meta.should_update(s)] == [4, 9]
    assert [s for s in range(10) if meta.should_update(s)] == [4, 9]
    assert meta.state_dict()["next_update_step"] == 4


def test_skipped_non_finite_decision_is_retried_by_the_wrapper_without_changing_the_strategy():
    meta = ScaleEvery(update_frequency=5)
    _, groups = two_group_model()
    w = OptimizerWrapper(torch.optim.SGD(groups, lr=0.1), meta)
    for step in range(4):
        w.update_hyperparameters({"loss": 1.0}, step)
    before = meta.state_dict()
    assert w.update_hyperparameters({"loss": math.nan}, 4) == []
    assert meta.state_dict() == before  # the strategy is untouched, and still answers per step
    assert [s for s in range(4, 10) if meta.should_update(s)] == [4, 9]
    assert w.update_hyperparameters({"loss": math.inf}, 5) == []  # the documented exception: retried
    assert len(w.update_hyperparameters({"loss": 1.0}, 6)) == 2
    assert meta.calls == 1 and meta.next_update_step == 11
    assert w.update_hyperparameters({"loss": 1.0}, 7) == []  # no retry after it decided
    restored = OptimizerWrapper(torch.optim.SGD(two_group_model()[1], lr=0.1), ScaleEvery(update_frequency=5))
    w.update_hyperparameters({"loss": math.nan}, 11)
    restored.load_state_dict(w.state_dict())
    assert len(restored.update_hyperparameters({"loss": 1.0}, 12)) == 2


def test_rejected_strategy_state_dict_changes_nothing():
    meta = LossTracker(update_frequency=2)
    meta.update_hparams({"loss": 1.0}, 1)
    before = meta.state_dict()
    bad = dict(before, interval="x")
    with pytest.raises(TypeError, match="interval"):
        meta.load_state_dict(bad)
    bad = dict(before, state={"last": 5.0, "bogus": 1})
    with pytest.raises(ValueError, match="bogus"):
        meta.load_state_dict(bad)
    assert meta.state_dict() == before


def test_decision_that_raises_restores_the_strategy_state():
    class Raises(LossTracker):
        def decide(self, metrics, step, groups):
            super().decide(metrics, step, groups)  # moves the state, then fails
            return [] if metrics["loss"] < 10 else metrics["val_loss"]

    meta = Raises()
    meta.update_hparams({"loss": 1.0}, 0)
    before = meta.state_dict()
    with pytest.raises(ValueError, match=r"metric 'val_loss' is missing \(metrics at step 1: \['loss'\]\)"):
        meta.update_hparams({"loss": 20.0}, 1)
    assert meta.state_dict() == before
