"""ray_metaopt: adjust a PyTorch optimizer's hyperparameters while it trains, inside Ray Tune."""

from .base import GroupState, HParamUpdate, MetaOptimizer
from .frequency import AdaptiveFrequency
from .history import Decision, SkippedDecision
from .wrapper import OptimizerWrapper

__all__ = [
    "AdaptiveFrequency",
    "Decision",
    "GroupState",
    "HParamUpdate",
    "MetaOptimizer",
    "OptimizerWrapper",
    "SkippedDecision",
]
__version__ = "0.1.0"
