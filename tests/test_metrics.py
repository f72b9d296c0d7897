"""Metric accumulation between decisions."""

from __future__ import annotations

import pytest
import torch

from ray_metaopt.metrics import MetricAccumulator, check_metrics, first_non_finite, to_floats


def test_last_keeps_latest_and_detaches():
    acc = MetricAccumulator("last")
    x = torch.tensor(2.0, requires_grad=True)
    acc.add({"loss": x * 3, "grad_norm": 1.0})
    acc.add({"loss": x * 4})
    assert acc.reduce() == {"loss": 8.0, "grad_norm": 1.0}


def test_mean_over_mixed_types_and_missing_keys():
    acc = MetricAccumulator("mean")
    acc.add({"loss": 1.0, "val_loss": 5.0})
    acc.add({"loss": torch.tensor(2.0)})
    acc.add({"loss": torch.tensor(6.0, dtype=torch.float16)})
    assert acc.reduce() == {"loss": 3.0, "val_loss": 5.0}
    acc.clear()
    assert len(acc) == 0


def test_state_round_trip_mid_interval():
    acc = MetricAccumulator("mean")
    acc.add({"loss": torch.tensor(1.0)})
    acc.add({"loss": 2.0})
    other = MetricAccumulator("mean")
    other.load_state_dict(acc.state_dict())
    other.add({"loss": torch.tensor(6.0)})
    assert other.reduce() == {"loss": 3.0}


def test_helpers():
    assert first_non_finite({"a": 1.0, "b": float("inf")}) == "b"
    assert first_non_finite({"a": 1.0}) is None
    assert to_floats({"a": torch.tensor([3.5]), "b": 1}) == {"a": 3.5, "b": 1.0}
    import numpy as np

    check_metrics({"a": np.float32(1.0), "b": np.int64(2)})
    with pytest.raises(TypeError, match="metric 'a' must be a number"):
        check_metrics({"a": np.zeros(3)})


# ---------------------------------------------------------------- issue 17
@pytest.mark.parametrize(
    "metrics, error, match",
    [
        ({"loss": 1.0, "tokens": 10**400}, ValueError, r"metric 'tokens' does not fit a float"),
        ({"loss": torch.tensor(1.0 + 2.0j)}, TypeError, r"metric 'loss' must be a real number .*complex"),
        ({"ok": 1.0, "flag": torch.tensor(True)}, TypeError, r"metric 'flag' .*torch.bool"),
    ],
)
def test_bad_metric_rejected_at_the_door_naming_the_key(metrics, error, match):
    with pytest.raises(error, match=match):
        check_metrics(metrics)


def test_mean_accumulator_stores_python_numbers_as_floats():
    acc = MetricAccumulator("mean")
    acc.add({"n": 10**300})
    acc.add({"n": 10**300})
    assert acc.reduce() == {"n": pytest.approx(1e300)}
