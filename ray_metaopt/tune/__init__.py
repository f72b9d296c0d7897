"""Ray Tune integration: the provided trainable, built-in tasks, and helpers for your own trainable.

Example:
    >>> from ray import tune
    >>> from ray_metaopt.tune import metaopt_trainable
    >>> tune.run(metaopt_trainable, config={"task": "teacher_student", "meta": "plateau"}, num_samples=2)
"""

from .builders import (
    TrialConfig,
    available_optimizers,
    available_strategies,
    build_meta_optimizer,
    build_optimizer,
    default_config,
    register_strategy,
    resolve_config,
)
from .reporting import (
    MetricsReporter,
    hparam_metrics,
    load_checkpoint,
    report_metrics,
    restore_from_tune,
    save_checkpoint,
    wrap_optimizer,
)
from .tasks import Task, TaskStep, available_tasks, make_task, register_task
from .trainable import TrainingRun, metaopt_trainable, rebuild_from_result, trainable_with_resources

# Experiment-level pieces; they import Ray, so they load on first use.
_LAZY = {
    "MetaOptCallback": ".callbacks",
    "read_trajectory": ".callbacks",
    "MetaAwareScheduler": ".scheduler",
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


__all__ = [
    "MetaAwareScheduler",
    "MetaOptCallback",
    "MetaStopper",
    "MetricsReporter",
    "Task",
    "TaskStep",
    "TrainingRun",
    "TrialConfig",
    "available_optimizers",
    "available_strategies",
    "available_tasks",
    "build_meta_optimizer",
    "build_optimizer",
    "default_config",
    "hparam_metrics",
    "load_checkpoint",
    "make_task",
    "meta_search_space",
    "meta_search_space_names",
    "metaopt_trainable",
    "plot_trajectories",
    "read_trajectory",
    "rebuild_from_result",
    "register_meta_search_space",
    "register_strategy",
    "register_task",
    "report_metrics",
    "resolve_config",
    "restore_from_tune",
    "sample_meta_config",
    "save_checkpoint",
    "trainable_with_resources",
    "wrap_optimizer",
]
