"""Reinforcement-learning meta-optimizer: a REINFORCE policy over lr / weight-decay actions.

Local learning in one process::

    meta = RLMetaOptimizer(update_frequency=10, total_steps=5000, seed=0)

One policy shared by every trial of an experiment (the driver starts the actor)::

    actor = start_policy_actor("policy", policy_config=cfg, checkpoint_uri="s3://bucket/policy")
    # in each trial:
    meta = RLMetaOptimizer(shared_policy="policy", **cfg)

Importing this package does not import Ray; the actor functions import it when called.
"""

from . import pretrained
from .actor import PolicyActor, PolicyClient, get_policy_actor, start_policy_actor
from .features import GLOBAL_FEATURES, GROUP_FEATURES, STATE_DIM, FeatureExtractor
from .meta_optimizer import RLMetaOptimizer
from .persistence import load_policy, save_policy
from .policy import PolicyConfig, PolicyNetwork
from .reinforce import Learner, reinforce_update

__all__ = [
    "GLOBAL_FEATURES",
    "GROUP_FEATURES",
    "STATE_DIM",
    "FeatureExtractor",
    "Learner",
    "PolicyActor",
    "PolicyClient",
    "PolicyConfig",
    "PolicyNetwork",
    "RLMetaOptimizer",
    "get_policy_actor",
    "load_policy",
    "pretrained",
    "reinforce_update",
    "save_policy",
    "start_policy_actor",
]
