"""Built-in training tasks for the provided trainable, and the registry users add theirs to.

Built-ins (no download at run time; CI-sized by default, ``scale`` for GPUs):

============================  =====================================================================
``teacher_student``           :class:`TeacherStudentTask`: regression with a known noise floor
``moe``                       :class:`MoETask`: clustered data, routed ``TinyMoE`` student
``digits``                    :class:`DigitsTask`: scikit-learn's bundled digits (extra ``[tasks]``)
``sequence``                  :class:`SequenceTask`: GRU on a delayed modular-sum memory task
============================  =====================================================================

A trial's ``task`` is a registered name, a :class:`Task` subclass (or any factory callable) or
a ``"package.module:attr"`` import path. The registry is per process: Ray Tune runs trials in
worker processes, so :func:`register_task` must run in a module that the workers import too
(for example the package that defines the task); passing the class itself as ``task`` always
works, because Tune ships the config to the workers.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Mapping

import torch

from .base import Task, TaskStep, resolve_device
from .digits import DigitsTask  # imports scikit-learn only when a DigitsTask is built
from .moe import MoETask
from .sequence import SequenceTask
from .teacher_student import TeacherStudentTask

TaskFactory = Callable[..., Task]

# name -> factory, or a "module:attr" path imported on first use
_REGISTRY: dict[str, TaskFactory | str] = {
    "teacher_student": TeacherStudentTask,
    "moe": MoETask,
    "digits": DigitsTask,
    "sequence": SequenceTask,
}


def _import(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def register_task(name: str, factory: TaskFactory | str, *, overwrite: bool = False) -> None:
    """Make ``factory`` available as ``config["task"] = name``.

    Args:
        name: the task's name (also the prefix of its extra metrics: ``<name>/<key>``).
        factory: a :class:`Task` subclass or a callable ``factory(seed=..., device=...,
            **task_config) -> Task``, or its ``"module:attr"`` import path.
        overwrite: replace an existing registration instead of raising ``ValueError``.

    Example:
        >>> register_task("my_regression", MyRegressionTask)
        >>> tune.run(metaopt_trainable, config={"task": "my_regression", "task_config": {...}})
    """
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name must be a non-empty str without '/', got name={name!r}")
    if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
        raise TypeError(f"factory must be a callable or a 'module:attr' path, got factory={factory!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"a task named {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def available_tasks() -> list[str]:
    """Registered task names, sorted."""
    return sorted(_REGISTRY)


def task_factory(task: str | TaskFactory) -> tuple[str, TaskFactory]:
    """``(name, factory)`` for a registered name, a factory, or a ``"module:attr"`` path.

    Raises:
        ValueError: an unknown name (the message lists the registered ones).
    """
    if callable(task):
        return getattr(task, "task_name", getattr(task, "__name__", "task")), task
    if not isinstance(task, str):
        raise TypeError(
            f"task must be a registered name, a Task subclass or a 'module:attr' path, got task={task!r}"
        )
    if task in _REGISTRY:
        factory = _REGISTRY[task]
        return task, _import(factory) if isinstance(factory, str) else factory
    if ":" in task:
        try:
            factory = _import(task)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"task={task!r} could not be imported: {exc}") from exc
        return task.rpartition(":")[2], factory
    raise ValueError(
        f"task must be one of {available_tasks()} (or a Task subclass / 'module:attr' path), "
        f"got task={task!r}. "
        "Tasks registered with register_task() in the driver are not seen by Tune's worker processes: "
        "register them in an imported module, or pass the class itself as config['task']"
    )


def make_task(
    task: str | TaskFactory,
    task_config: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    device: str | torch.device | None = "auto",
) -> tuple[str, Task]:
    """Build a task from its name (or factory) and ``task_config``; returns ``(name, task)``.

    Unknown ``task_config`` keys raise ``ValueError`` listing the accepted ones.

    Example:
        >>> name, task = make_task("teacher_student", {"noise_std": 0.2}, seed=3, device="cpu")
    """
    name, factory = task_factory(task)
    task_config = dict(task_config or {})
    for reserved in ("seed", "device"):
        if reserved in task_config:
            raise ValueError(
                f"task_config must not set {reserved!r} (the trial's top-level config does), "
                f"got task_config={task_config!r}"
            )
    accepted = _keyword_names(factory)
    if accepted is not None:
        unknown = sorted(set(task_config) - accepted)
        if unknown:
            raise ValueError(
                f"task_config for task {name!r} has unknown keys {unknown}; "
                f"accepted keys are {sorted(accepted - {'seed', 'device'})}"
            )
    built = factory(seed=seed, device=device, **task_config)
    if not isinstance(built, Task):
        raise TypeError(f"task factory {factory!r} returned {type(built).__name__}, not a Task")
    return name, built


def _keyword_names(factory: Callable) -> set[str] | None:
    """Keyword arguments ``factory`` accepts, or None when it takes ``**kwargs``."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


__all__ = [
    "DigitsTask",
    "MoETask",
    "SequenceTask",
    "Task",
    "TaskStep",
    "TeacherStudentTask",
    "available_tasks",
    "make_task",
    "register_task",
    "resolve_device",
    "task_factory",
]
