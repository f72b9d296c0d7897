"""Ray Tune integration: the provided trainable, Tune callbacks/schedulers/stoppers, helpers for your own trainable.

Example:
    >>> from ray import tune
    >>> from ray_metaopt.tune import metaopt_trainable
    >>> tune.run(metaopt_trainable, config={"task": "teacher_student", "meta": "plateau"}, num_samples=2)
"""

# The training layer (Ray-free, :mod:`ray_metaopt.training`), re-exported: a Tune user needs both.
from .. import training as _training
from ..training import *  # noqa: F403
from .reporting import report_metrics, restore_from_tune
from .trainable import metaopt_trainable, rebuild_from_result, trainable_with_resources

# Experiment-level pieces; they import Ray, so they load on first use.
_LAZY = {
    "MetaOptCallback": ".callbacks",
    "read_trajectory": ".callbacks",
    "MetaAwareScheduler": ".scheduler",
    "GroupedScheduler": ".grouped_scheduler",
    "MetaStopper": ".stopper",
    "meta_search_space": ".search_space",
    "meta_search_space_names": ".search_space",
    "register_meta_search_space": ".search_space",
    "sample_meta_config": ".search_space",
    "plot_trajectories": ".plotting",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(
    {
        *(name for name in _training.__all__ if name != "paired_reference"),
        *_LAZY,
        "metaopt_trainable",
        "rebuild_from_result",
        "report_metrics",
        "restore_from_tune",
        "trainable_with_resources",
    }
)
