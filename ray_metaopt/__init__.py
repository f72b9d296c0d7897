"""ray_metaopt: adjust a PyTorch optimizer's hyperparameters while it trains, inside Ray Tune."""

from .base import GroupState, HParamUpdate, MetaOptimizer
from .distributed import DistributedOptimizerWrapper
from .expert_gate import ExpertGateMetaOptimizer, SmartExpertGateMetaOptimizer
from .frequency import AdaptiveFrequency
from .history import Decision, SkippedDecision
from .moe import TinyMoE, moe_param_groups, routing_metrics
from .plateau import AdvancedPlateauMetaOptimizer, PlateauMetaOptimizer
from .registry import StrategySpec, register_strategy
from .rl import RLMetaOptimizer
from .wrapper import OptimizerWrapper

__all__ = [
    "AdaptiveFrequency",
    "AdvancedPlateauMetaOptimizer",
    "Decision",
    "DistributedOptimizerWrapper",
    "ExpertGateMetaOptimizer",
    "GroupState",
    "HParamUpdate",
    "MetaOptimizer",
    "OptimizerWrapper",
    "PlateauMetaOptimizer",
    "RLMetaOptimizer",
    "SkippedDecision",
    "SmartExpertGateMetaOptimizer",
    "StrategySpec",
    "TinyMoE",
    "moe_param_groups",
    "register_strategy",
    "routing_metrics",
]
__version__ = "0.1.0"
