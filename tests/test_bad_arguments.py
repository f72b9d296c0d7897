"""Every public constructor rejects a bad argument with a ValueError/TypeError naming the argument
and the value (issue 17, item 11): one table, swept."""

from __future__ import annotations

import math

import pytest
import torch

from core_strategies import ScaleEvery
from ray_metaopt import (
    AdaptiveFrequency,
    AdvancedPlateauMetaOptimizer,
    DistributedOptimizerWrapper,
    ExpertGateMetaOptimizer,
    OptimizerWrapper,
    PlateauMetaOptimizer,
    RLMetaOptimizer,
    SmartExpertGateMetaOptimizer,
)
from ray_metaopt.history import DecisionLog
from ray_metaopt.metrics import MetricAccumulator
from ray_metaopt.rl.actor import PolicyActor
from ray_metaopt.tune.callbacks import MetaOptCallback


def _opt():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)


def wrapper(**kw):
    return OptimizerWrapper(_opt(), ScaleEvery(), **kw)


def distributed(**kw):
    return DistributedOptimizerWrapper(_opt(), ScaleEvery(), **kw)


def callback(**kw):
    kw.setdefault("policy_name", "p")
    return MetaOptCallback(**kw)


NAN, INF = math.nan, math.inf
STRATEGIES = [PlateauMetaOptimizer, AdvancedPlateauMetaOptimizer, ExpertGateMetaOptimizer,
              SmartExpertGateMetaOptimizer, RLMetaOptimizer]

# (constructor, argument, bad value, what the message must show of the value)
CASES = [
    (wrapper, "max_log_records", True, "True"),
    (wrapper, "max_log_records", -1, "-1"),
    (wrapper, "max_log_records", 1.5, "1.5"),
    (wrapper, "max_log_records", "abc", "'abc'"),
    (wrapper, "max_log_records", NAN, "nan"),
    (wrapper, "metric_reduction", "median", "'median'"),
    (distributed, "max_log_records", -1, "-1"),
    (distributed, "decision_rank", -1, "-1"),
    (distributed, "sync_state", 1, "1"),
    (DecisionLog, "max_records", -3, "-3"),
    (MetricAccumulator, "reduction", "sum", "'sum'"),
    (AdaptiveFrequency, "monitor", "", "''"),
    (AdaptiveFrequency, "monitor", 3, "3"),
    (AdaptiveFrequency, "factor", 1.0, "1.0"),
    (AdaptiveFrequency, "min_interval", 0, "0"),
    (AdaptiveFrequency, "fast_change", NAN, "nan"),
    (PolicyActor, "policy_config", "abc", "'abc'"),
    (PolicyActor, "policy_path", 3, "3"),
    (PolicyActor, "checkpoint_uri", 3, "3"),
    (PolicyActor, "checkpoint_every", 0, "0"),
    (PolicyActor, "name", "", "''"),
    (callback, "policy_config", {"bogus": 1}, "bogus"),
    (callback, "policy_config", "abc", "'abc'"),
    (callback, "policy_checkpoint_uri", 3, "3"),
    (callback, "policy_save_path", 3, "3"),
    (callback, "trajectory_dir", 3, "3"),
    (callback, "stats_interval_s", NAN, "nan"),
    (callback, "max_restarts", -2, "-2"),
    (RLMetaOptimizer, "stop_action", 1, "1"),
    (RLMetaOptimizer, "on_stop", "stop", "'stop'"),
    (RLMetaOptimizer, "initial_stop_prob", 0.9, "0.9"),
]
for cls in STRATEGIES:
    CASES += [
        (cls, "update_frequency", 0, "0"),
        (cls, "update_frequency", True, "True"),
        (cls, "min_lr", INF, "inf"),
        (cls, "min_lr", -1.0, "-1.0"),
        (cls, "max_lr", NAN, "nan"),
        (cls, "max_lr", "big", "'big'"),
        (cls, "max_weight_decay", -0.1, "-0.1"),
        (cls, "adaptive_frequency", 5, "5"),
    ]


def _id(case):
    ctor, arg, value, _ = case
    return f"{getattr(ctor, '__name__', ctor)}-{arg}={value!r}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_bad_constructor_argument_named_with_its_value(case):
    ctor, arg, value, shown = case
    with pytest.raises((TypeError, ValueError)) as info:
        ctor(**{arg: value})
    message = str(info.value)
    assert arg in message and shown in message, message


@pytest.mark.parametrize("cls", STRATEGIES)
def test_min_lr_above_max_lr_rejected_by_every_strategy(cls):
    with pytest.raises(ValueError, match=r"min_lr must be <= max_lr, got min_lr=1.0, max_lr=0.01"):
        cls(min_lr=1.0, max_lr=0.01)
