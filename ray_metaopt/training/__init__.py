"""A training run without Ray: tasks, the config-to-objects builders, reports and checkpoint files.

Everything a Tune trial runs lives here and imports and runs with Ray absent; :mod:`ray_metaopt.tune`
only adapts it to Tune (``tune.report``, callbacks, schedulers, stoppers, search spaces).

Example:
    >>> from ray_metaopt.training import TrainingRun
    >>> run = TrainingRun({"task": "teacher_student", "meta": "plateau", "max_steps": 40, "eval_interval": 20})
    >>> last = run.train(lambda result, checkpoint_dir: None)
    >>> last["step"]
    40
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
    wrap_optimizer,
)
from .checkpoint import load_checkpoint, save_checkpoint
from .reporter import MetricsReporter, hparam_metrics
from .run import TrainingRun, paired_reference
from .tasks import Task, TaskStep, available_tasks, make_task, register_task

__all__ = [
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
    "paired_reference",
    "register_strategy",
    "register_task",
    "resolve_config",
    "save_checkpoint",
    "wrap_optimizer",
]
