"""State features: exact values on a known metric sequence, flags for missing metrics, clamping."""

from __future__ import annotations

import math

import pytest

from ray_metaopt.base import GroupState
from ray_metaopt.rl.features import GLOBAL_FEATURES, GROUP_FEATURES, STATE_DIM, FeatureExtractor


def feature_dict(fx, state, step, interval=10):
    return dict(zip(GLOBAL_FEATURES, fx.global_features(state, step, interval)))


def test_layout_is_fixed():
    assert STATE_DIM == len(GLOBAL_FEATURES) + len(GROUP_FEATURES) == 20


def test_features_follow_a_known_sequence():
    fx = FeatureExtractor(update_frequency=10, total_steps=100)
    state = fx.initial_state()
    fx.observe(state, {"loss": 1.0, "grad_norm": 2.0, "step_time": 0.1}, step=9)
    first = feature_dict(fx, state, 9)
    # First observation: no trend yet, everything relative to itself.
    assert first["log_loss_ratio"] == 0.0
    assert first["loss_trend_fast"] == 0.0
    assert first["has_grad_norm"] == 1.0 and first["log_grad_norm_ratio"] == 0.0
    assert first["progress"] == pytest.approx(0.1) and first["has_progress"] == 1.0
    assert first["has_val_loss"] == 0.0 and first["val_gap"] == 0.0

    fx.observe(
        state,
        {"loss": math.exp(-0.1), "grad_norm": 1.0, "step_time": 0.2, "val_loss": math.exp(0.0)},
        step=19,
    )
    f = feature_dict(fx, state, 19)
    change = -0.1 / 10  # d log(loss) per step
    expected = {
        "log_loss_ratio": -0.1,
        "loss_trend_fast": math.asinh(1000 * 0.5 * change),
        "loss_trend_mid": math.asinh(1000 * 0.1 * change),
        "loss_trend_slow": math.asinh(1000 * 0.02 * change),
        "loss_volatility": math.asinh(1000 * 0.1 * abs(change)),
        "log_grad_norm_ratio": math.log(0.5),
        "grad_norm_trend": math.asinh(1000 * 0.1 * math.log(0.5) / 10),
        "has_grad_norm": 1.0,
        "progress": 0.2,
        "has_progress": 1.0,
        "log_step_time_ratio": math.log(2.0),
        "has_step_time": 1.0,
        "val_gap": 0.1,  # log(val_loss / loss)
        "has_val_loss": 1.0,
        "log_interval": 0.0,
    }
    for name, value in expected.items():
        assert f[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize(
    ("interval", "expected"),
    [(10, 0.0), (20, 1.0), (5, -1.0), (40, 2.0)],
)
def test_interval_feature_is_log2_of_interval_over_update_frequency(interval, expected):
    fx = FeatureExtractor(update_frequency=10)
    state = fx.initial_state()
    fx.observe(state, {"loss": 1.0}, step=9)
    assert feature_dict(fx, state, 9, interval)["log_interval"] == expected


def test_missing_metrics_give_zero_and_flags_and_unknown_progress():
    fx = FeatureExtractor(update_frequency=10, total_steps=None)
    state = fx.initial_state()
    fx.observe(state, {"loss": 3.0}, step=9)
    fx.observe(state, {"loss": 2.0}, step=19)
    f = feature_dict(fx, state, 19)
    for name in (
        "log_grad_norm_ratio",
        "grad_norm_trend",
        "has_grad_norm",
        "progress",
        "has_progress",
        "log_step_time_ratio",
        "has_step_time",
        "val_gap",
        "has_val_loss",
    ):
        assert f[name] == 0.0, name


def test_features_are_clamped_and_finite():
    fx = FeatureExtractor(update_frequency=1, clip=5.0)
    state = fx.initial_state()
    fx.observe(state, {"loss": 1.0}, step=0)
    fx.observe(state, {"loss": 1e-30}, step=1)  # log-loss drops by 69
    f = fx.global_features(state, 1, 1)
    assert all(math.isfinite(x) and -5.0 <= x <= 5.0 for x in f)
    assert dict(zip(GLOBAL_FEATURES, f))["log_loss_ratio"] == -5.0


@pytest.mark.parametrize(("loss", "floor"), [(0.0, 0.0), (-1.0, 0.0), (0.5, 0.5)])
def test_loss_at_or_below_the_floor_stays_finite(loss, floor):
    fx = FeatureExtractor(loss_floor=floor)
    assert math.isfinite(fx.log_loss(loss))


def test_group_features_lr_ratio_and_weight_decay_shift():
    fx = FeatureExtractor(wd_unit=1e-5)
    g = GroupState(
        0, "", "", lr=0.02, weight_decay=2e-5, initial_lr=0.01, initial_weight_decay=0.0, num_params=1
    )
    # lr ratio, wd shift, log10(lr) + 3, log of the multiplier the last action set
    assert fx.group_features(g) == pytest.approx([math.log(2.0), math.asinh(2.0), math.log10(0.02) + 3, 0.0])
    assert fx.group_features(g, 2.0)[3] == pytest.approx(math.log(2.0))
    no_wd = GroupState(
        1, "", "", lr=0.005, weight_decay=None, initial_lr=0.01, initial_weight_decay=None, num_params=1
    )
    assert fx.group_features(no_wd, 0.5) == pytest.approx([math.log(0.5), 0.0, math.log10(0.005) + 3, math.log(0.5)])
    assert fx.mean_group_features([g, no_wd], [2.0]) == pytest.approx(
        [0.0, math.asinh(2.0) / 2, (math.log10(0.02) + math.log10(0.005)) / 2 + 3, math.log(2.0) / 2]
    )


def test_absolute_scale_features_tell_a_small_lr_from_a_large_one():
    # The same run relative to its start, at lrs a decade apart: only the absolute lr differs.
    fx = FeatureExtractor()
    small, large = (
        GroupState(0, "", "", lr=lr, weight_decay=None, initial_lr=lr, initial_weight_decay=None, num_params=1)
        for lr in (1e-4, 1e-2)
    )
    fs, fl = dict(zip(GROUP_FEATURES, fx.group_features(small))), dict(zip(GROUP_FEATURES, fx.group_features(large)))
    assert fs["log_lr_ratio"] == fl["log_lr_ratio"] == 0.0
    assert fs["log10_lr"] == pytest.approx(-1.0) and fl["log10_lr"] == pytest.approx(1.0)
    state = fx.initial_state()
    fx.observe(state, {"loss": 0.05}, step=9)
    assert feature_dict(fx, state, 9)["log_loss"] == pytest.approx(math.log(0.05))


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragment"),
    [
        ({"update_frequency": 0}, ValueError, "update_frequency"),
        ({"total_steps": 0}, ValueError, "total_steps"),
        ({"wd_unit": 0.0}, ValueError, "wd_unit"),
        ({"loss_floor": math.inf}, ValueError, "loss_floor"),
        ({"clip": -1.0}, ValueError, "clip"),
    ],
)
def test_bad_arguments(kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        FeatureExtractor(**kwargs)


def test_extreme_finite_inputs_never_raise_and_stay_finite():
    # 1e300 -> 1e-300 losses, step times and lrs whose ratio under- or overflows a float.
    fx = FeatureExtractor(update_frequency=1, loss_floor=-1e308)
    state = fx.initial_state()
    for step, (loss, t) in enumerate([(1e300, 1e300), (1e-300, 1e-300), (1.7e308, 1e-300)]):
        fx.observe(state, {"loss": loss, "grad_norm": loss, "step_time": t}, step=step)
        assert all(math.isfinite(x) for x in fx.global_features(state, step, 1))
    g = GroupState(0, "", "", lr=1e-300, weight_decay=None, initial_lr=1e300, initial_weight_decay=None, num_params=1)
    assert fx.group_features(g) == [-5.0, 0.0, -5.0, 0.0]
    assert fx.group_features(g, 1e-300) == [-5.0, 0.0, -5.0, -5.0]
