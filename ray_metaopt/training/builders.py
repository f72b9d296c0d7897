"""From a trial's config to the objects it trains with: optimizer, meta-optimizer, lr schedule.

Every name in a config is checked here, and a wrong one fails with a message that lists the
valid choices (``optimizer must be one of ['adadelta', 'adagrad', ...], got optimizer='adamm'``),
so a misconfigured Tune trial errors at its start instead of training the wrong thing.
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence

import torch

from .._validation import accepted_kwargs, check_choice, check_int, check_known_keys, check_range
from ..base import GroupState, HParamUpdate, MetaOptimizer
from ..metrics import REDUCTIONS
from ..registry import default_monitor, load_path, resolve_strategy, strategy_names
from ..registry import register_strategy as register_strategy  # re-exported by ray_metaopt.tune and ray_metaopt.training
from ..schedules import SCHEDULE_SHAPES
from ..wrapper import OptimizerWrapper
from .reporter import reporter_for

# --------------------------------------------------------------------------- optimizers
# torch.optim classes that cannot be driven by a plain `loss.backward(); step()` loop over
# dense parameters of any shape.
_UNSUPPORTED_OPTIMIZERS = {
    "LBFGS": "needs a closure",
    "SparseAdam": "needs sparse gradients",
    "Muon": "only handles 2-D parameters",
}


def available_optimizers() -> dict[str, type[torch.optim.Optimizer]]:
    """``{lower-case name: class}`` of the ``torch.optim`` optimizers a trial can use."""
    found = {}
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if (
            inspect.isclass(cls)
            and issubclass(cls, torch.optim.Optimizer)
            and cls is not torch.optim.Optimizer
            and name not in _UNSUPPORTED_OPTIMIZERS
        ):
            found[name.lower()] = cls
    return dict(sorted(found.items()))


def optimizer_class(name: str | type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """The optimizer class for a ``torch.optim`` name (any case), a class, or a ``"module:Class"`` path.

    Example:
        >>> optimizer_class("adamw")
        <class 'torch.optim.adamw.AdamW'>
    """
    if inspect.isclass(name) and issubclass(name, torch.optim.Optimizer):
        return name
    if not isinstance(name, str):
        raise TypeError(
            f"optimizer must be a name, an Optimizer subclass or 'module:Class', got optimizer={name!r}"
        )
    if ":" in name:
        cls = load_path(name, "optimizer")
        if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
            raise TypeError(f"optimizer={name!r} is not a torch.optim.Optimizer subclass")
        return cls
    key = name.lower()
    if key in {n.lower() for n in _UNSUPPORTED_OPTIMIZERS}:
        reason = next(r for n, r in _UNSUPPORTED_OPTIMIZERS.items() if n.lower() == key)
        raise ValueError(f"optimizer={name!r} is not supported by the provided trainable ({reason})")
    choices = available_optimizers()
    if key not in choices:
        raise ValueError(
            f"optimizer must be one of {list(choices)} (or 'module:Class'), got optimizer={name!r}"
        )
    return choices[key]


def _signature_defaults(cls: type) -> dict[str, inspect.Parameter]:
    return {
        n: p
        for n, p in inspect.signature(cls).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "params"
    }


def optimizer_defaults(
    cls: type[torch.optim.Optimizer], optimizer_config: Mapping[str, Any]
) -> tuple[float, float | None]:
    """``(lr, weight_decay)`` the groups start from: the config's, else the optimizer's defaults.

    ``weight_decay`` is ``None`` for optimizers that have none (e.g. ``Rprop``).
    """
    params = _signature_defaults(cls)
    lr = optimizer_config.get("lr", params["lr"].default if "lr" in params else 1e-3)
    if isinstance(lr, torch.Tensor):
        lr = float(lr)
    if "weight_decay" in optimizer_config:
        wd = optimizer_config["weight_decay"]
    elif "weight_decay" in params and isinstance(params["weight_decay"].default, numbers.Real):
        wd = params["weight_decay"].default
    else:
        wd = None
    return float(lr), None if wd is None else float(wd)


def check_optimizer_config(
    cls: type[torch.optim.Optimizer], optimizer_config: Mapping[str, Any]
) -> dict[str, Any]:
    """Reject keys ``cls`` does not take and non-finite / negative ``lr`` and ``weight_decay``."""
    if not isinstance(optimizer_config, Mapping):
        raise TypeError(f"optimizer_config must be a dict, got optimizer_config={optimizer_config!r}")
    accepted = _signature_defaults(cls)
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls).parameters.values())
    check_known_keys("optimizer_config", optimizer_config, None if takes_kwargs else set(accepted), cls.__name__)
    config = dict(optimizer_config)
    if "lr" in config:
        config["lr"] = check_range(
            "optimizer_config['lr']", config["lr"], 0.0, math.inf, low_open=True, high_open=True
        )
    if "weight_decay" in config:
        config["weight_decay"] = check_range(
            "optimizer_config['weight_decay']", config["weight_decay"], 0.0, math.inf, high_open=True
        )
    return config


def build_optimizer(
    name: str | type[torch.optim.Optimizer], params: Any, optimizer_config: Mapping[str, Any] | None = None
) -> torch.optim.Optimizer:
    """Build a ``torch.optim`` optimizer by name over ``params`` (tensors or param groups).

    Args:
        name: ``"adamw"``, ``"sgd"``... (see :func:`available_optimizers`), a class, or ``"module:Class"``.
        params: parameters or param-group dicts (a group's own ``lr``/``weight_decay`` win).
        optimizer_config: keyword arguments of the optimizer (``lr``, ``weight_decay``, ``betas``...).

    Example:
        >>> opt = build_optimizer("sgd", model.parameters(), {"lr": 0.1, "momentum": 0.9})
    """
    cls = optimizer_class(name)
    config = check_optimizer_config(cls, optimizer_config or {})
    try:
        return cls(params, **config)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{cls.__name__} rejected optimizer_config={dict(config)!r}: {exc}") from exc


# --------------------------------------------------------------------------- meta-optimizers
class FixedHyperparameters(MetaOptimizer):
    """The ``meta="none"`` baseline: never decides, never reads a metric (no host sync).

    Example:
        >>> OptimizerWrapper(torch.optim.AdamW(model.parameters()), FixedHyperparameters())
    """

    def __init__(self) -> None:
        super().__init__(update_frequency=1)
        self.reset()

    def should_update(self, step: int) -> bool:
        return False

    def decide(
        self, metrics: Mapping[str, float], step: int, groups: Sequence[GroupState]
    ) -> list[HParamUpdate]:
        return []


def available_strategies() -> list[str]:
    """Names accepted as ``config["meta"]`` (:func:`ray_metaopt.registry.strategy_names`)."""
    return strategy_names()


def strategy_factory(meta: str | Callable[..., MetaOptimizer]) -> tuple[str, Callable[..., MetaOptimizer]]:
    """``(name, factory)`` of a strategy name, class or ``"module:Class"`` path."""
    return resolve_strategy(meta)


def build_meta_optimizer(
    meta: str | Callable[..., MetaOptimizer] = "plateau",
    meta_config: Mapping[str, Any] | None = None,
    *,
    total_steps: int | None = None,
    seed: int | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> MetaOptimizer:
    """Build a strategy from its name and constructor kwargs.

    ``total_steps`` and ``seed`` are passed to strategies that take them (the RL strategy) when
    ``meta_config`` does not set them, and so are ``defaults`` entries the strategy accepts. A
    key the strategy does not take fails with the list of those it does; invalid values fail
    with the strategy's own validation message.

    Example:
        >>> build_meta_optimizer("plateau", {"patience": 3, "lr_factor": 0.5})
        PlateauMetaOptimizer(update_frequency=1)
    """
    name, factory = strategy_factory(meta)
    if meta_config is not None and not isinstance(meta_config, Mapping):
        raise TypeError(
            f"meta_config must be a dict of constructor arguments, got meta_config={meta_config!r}"
        )
    config = dict(meta_config or {})
    accepted = accepted_kwargs(factory)
    check_known_keys("meta_config", config, accepted, f"meta={name!r} ({getattr(factory, '__name__', factory)})")
    if accepted is not None:
        implied = {**dict(defaults or {}), "total_steps": total_steps, "seed": seed}
        for key, value in implied.items():
            if value is not None and key not in config and key in accepted:
                config[key] = value
    try:
        strategy = factory(**config)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"invalid meta_config for meta={name!r}: {exc}") from exc
    if not isinstance(strategy, MetaOptimizer):
        raise TypeError(f"meta={name!r} built {type(strategy).__name__}, not a MetaOptimizer")
    return strategy


def trial_meta_defaults(meta: Any, eval_interval: int) -> dict[str, Any]:
    """Defaults the provided trainable gives a strategy, under what ``meta_config`` sets.

    Decisions happen at evaluations (``update_frequency=eval_interval``), where ``val_loss`` is
    known, and a strategy registered with ``monitor="val_loss"`` (the plateau strategies) watches
    ``val_loss``: torch's ``ReduceLROnPlateau`` used per
    epoch on the validation loss, instead of a per-step rule on the noisy minibatch loss (which
    rarely beats its luckiest batch and so cuts the lr every ``patience`` steps). Strategies that
    average their metrics over recent decisions (the expert/gate ones, ``metric_window``) read
    each evaluation's values as given.
    """
    defaults: dict[str, Any] = {"update_frequency": eval_interval, "metric_window": 1}
    monitor = default_monitor(meta)
    if monitor is not None:
        defaults["monitor"] = monitor
    return defaults


def check_val_loss_alignment(strategy: MetaOptimizer, eval_interval: int) -> None:
    """Fail early when a strategy monitors ``val_loss`` but would decide between evaluations."""
    if getattr(strategy, "monitor", None) != "val_loss":
        return
    if strategy.update_frequency % eval_interval or strategy.adaptive_frequency is not None:
        raise ValueError(
            "meta_config monitors 'val_loss', which exists only at evaluations "
            f"(every eval_interval={eval_interval} "
            f"steps), so update_frequency must be a multiple of {eval_interval} and adaptive_frequency None; "
            f"got update_frequency={strategy.update_frequency}, "
            f"adaptive_frequency={strategy.adaptive_frequency!r}"
        )


def wrap_optimizer(
    optimizer: torch.optim.Optimizer,
    meta: str | MetaOptimizer | type = "plateau",
    meta_config: Mapping[str, Any] | None = None,
    *,
    total_steps: int | None = None,
    seed: int | None = None,
    metric_reduction: str = "last",
) -> OptimizerWrapper:
    """Wrap ``optimizer`` with a strategy given by name (as in the trainable's ``meta``) or instance.

    Args:
        optimizer: the torch optimizer to adjust.
        meta: a strategy name (``"plateau"``, ``"expert_gate"``, ``"rl"``, ``"none"``...), a
            :class:`~ray_metaopt.MetaOptimizer` instance, or a class.
        meta_config: constructor arguments when ``meta`` is a name or class.
        total_steps: passed to strategies that take it (RL) unless ``meta_config`` sets it.
        seed: passed to strategies that take it unless ``meta_config`` sets it.
        metric_reduction: ``"last"`` or ``"mean"``.

    Example:
        >>> opt = wrap_optimizer(torch.optim.AdamW(model.parameters()), "plateau", {"patience": 3})
    """
    if isinstance(meta, MetaOptimizer):
        if meta_config:
            raise ValueError(
                "meta_config is only used when meta is a name or a class, "
                "got both an instance and meta_config"
            )
        strategy = meta
    else:
        strategy = build_meta_optimizer(meta, meta_config, total_steps=total_steps, seed=seed)
    wrapper = OptimizerWrapper(optimizer, strategy, metric_reduction=metric_reduction)
    reporter_for(wrapper).restart_timer(0)  # the first report's steps_per_second counts from here
    return wrapper


# --------------------------------------------------------------------------- lr schedules
SCHEDULES = tuple(SCHEDULE_SHAPES)


def build_schedule(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    final_factor: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """A per-step lr schedule (``None`` for ``"constant"`` without warmup).

    ``"cosine"`` and ``"linear"`` decay from the configured lr to ``final_factor`` times it over
    ``total_steps`` after a linear warmup of ``warmup_steps``. Attach it to the
    :class:`~ray_metaopt.OptimizerWrapper` so meta-optimizer changes scale the schedule instead
    of being overwritten at the next step.

    Example:
        >>> sched = wrapper.attach_scheduler(build_schedule(wrapper, "cosine", 1000, warmup_steps=50))
    """
    schedule = check_choice("schedule", schedule, SCHEDULES)
    total_steps = check_int("total_steps", total_steps, minimum=1)
    warmup = check_int("schedule_config['warmup_steps']", warmup_steps, minimum=0)
    final = check_range("schedule_config['final_factor']", final_factor, 0.0, 1.0)
    if schedule == "constant" and warmup == 0:
        return None
    decay_steps = max(1, total_steps - warmup)
    shape = SCHEDULE_SHAPES[schedule]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        return final + (1.0 - final) * shape(min(1.0, (step - warmup) / decay_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- trial config
@dataclass(frozen=True)
class TrialConfig:
    """The provided trainable's validated configuration (see :func:`resolve_config` for defaults).

    Args:
        task: registered task name (``teacher_student``, ``moe``, ``digits``, ``sequence``), a
            :class:`~ray_metaopt.training.tasks.Task` subclass, or ``"module:attr"``. Required.
        task_config: the task's keyword arguments (``scale``, ``noise_std``, ...).
        optimizer: ``torch.optim`` name (``adamw``, ``adam``, ``sgd``, ``rmsprop``, ...).
        optimizer_config: the optimizer's keyword arguments (``lr``, ``weight_decay``, ...).
        meta: strategy: ``none``, ``plateau``, ``advanced_plateau``, ``expert_gate``,
            ``smart_expert_gate``, ``rl`` (or a class / ``"module:Class"``).
        meta_config: the strategy's constructor arguments, over the trainable's defaults
            (:func:`trial_meta_defaults`: decide at evaluations; plateau strategies watch ``val_loss``).
        max_steps: optimizer steps of the trial.
        eval_interval: steps between evaluations (each evaluation reports to Tune).
        batch_size: training batch size.
        seed: the trial's seed (model init, batch stream, strategy).
        grad_clip: max gradient norm (``None``: no clipping; the norm is still measured).
        checkpoint_interval: evaluations between checkpoints (0: only when the trial ends).
        metric_reduction: how the wrapper reduces metrics between decisions: ``"mean"`` (default:
            the mean training loss since the last decision) or ``"last"``.
        device: ``"auto"`` (CUDA when the trial has a GPU), ``"cpu"`` or ``"cuda"``.
        schedule: ``"constant"``, ``"cosine"`` or ``"linear"`` lr schedule under the strategy.
        schedule_config: ``warmup_steps``, ``final_factor`` of the schedule.
        paired_reference: first train the same trial with ``meta="none"`` (same seed, batches,
            optimizer and schedule) and give the strategy that run's training loss at every step
            and its ``val_loss`` at every evaluation as the metrics ``reference_loss`` and
            ``reference_val_loss``: the RL reward then compares against the base schedule at
            the same noise (:mod:`ray_metaopt.rl.rewards`). Doubles the trial's compute; for
            policy-training episodes, not for evaluation. A restored trial recomputes its
            reference from its config (deterministic on the CPU), so under PBT, whose exploits
            change the config mid-run, the reference no longer pairs with the trial's history.
    """

    task: Any
    task_config: dict = field(default_factory=dict)
    optimizer: Any = "adamw"
    optimizer_config: dict = field(default_factory=lambda: {"lr": 1e-3})
    meta: Any = "plateau"
    meta_config: dict = field(default_factory=dict)
    max_steps: int = 400
    eval_interval: int = 20
    batch_size: int = 64
    seed: int = 0
    grad_clip: float | None = 1.0
    checkpoint_interval: int = 1
    metric_reduction: str = "mean"
    device: str = "auto"
    schedule: str = "constant"
    schedule_config: dict = field(default_factory=dict)
    paired_reference: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


CONFIG_KEYS = tuple(f.name for f in fields(TrialConfig))


def default_config() -> dict[str, Any]:
    """Every config key but ``task`` with its default value."""
    defaults = TrialConfig(task=None).to_dict()
    del defaults["task"]
    return defaults


def resolve_config(config: Mapping[str, Any]) -> TrialConfig:
    """Validate a trial config and fill in defaults.

    Raises ``ValueError``/``TypeError`` naming the key, the value and (for names) the valid
    choices: a missing ``task``, an unknown key (keys starting with ``_`` are left for the
    user), a task/optimizer/strategy/schedule name that does not exist, wrong types or ranges.
    The task, optimizer and strategy constructors validate their own ``*_config`` further when
    the trial builds them.

    Example:
        >>> resolve_config({"task": "digits", "meta": "none"}).max_steps
        400
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, got config={config!r}")
    if "task" not in config:
        from .tasks import available_tasks

        raise ValueError(f"config must set 'task', one of {available_tasks()}, got keys {sorted(config)}")
    unknown = sorted(k for k in config if k not in CONFIG_KEYS and not str(k).startswith("_"))
    if unknown:
        raise ValueError(f"config has unknown keys {unknown}; valid keys are {list(CONFIG_KEYS)}")
    values = {k: config[k] for k in CONFIG_KEYS if k in config}
    for key in ("task_config", "optimizer_config", "meta_config", "schedule_config"):
        if key in values:
            if values[key] is None:
                values[key] = {}
            if not isinstance(values[key], Mapping):
                raise TypeError(f"{key} must be a dict, got {key}={values[key]!r}")
            values[key] = dict(values[key])
    resolved = TrialConfig(**values)

    from .tasks import task_factory

    task_factory(resolved.task)  # unknown task name -> ValueError listing the registered ones
    optimizer_class(resolved.optimizer)
    strategy_factory(resolved.meta)
    check_int("max_steps", resolved.max_steps, minimum=1)
    check_int("eval_interval", resolved.eval_interval, minimum=1)
    check_int("batch_size", resolved.batch_size, minimum=1)
    check_int("seed", resolved.seed, minimum=0)
    check_int("checkpoint_interval", resolved.checkpoint_interval, minimum=0)
    if resolved.grad_clip is not None:
        check_range("grad_clip", resolved.grad_clip, 0.0, math.inf, low_open=True)
    if not isinstance(resolved.paired_reference, bool):
        raise TypeError(f"paired_reference must be a bool, got paired_reference={resolved.paired_reference!r}")
    check_choice("metric_reduction", resolved.metric_reduction, REDUCTIONS)
    check_choice("device", resolved.device, ("auto", "cpu", "cuda"))
    check_choice("schedule", resolved.schedule, SCHEDULES)
    unknown = sorted(set(resolved.schedule_config) - {"warmup_steps", "final_factor"})
    if unknown:
        raise ValueError(
            f"schedule_config has unknown keys {unknown}; valid keys are ['final_factor', 'warmup_steps']"
        )
    return resolved


__all__ = [
    "CONFIG_KEYS",
    "SCHEDULES",
    "FixedHyperparameters",
    "accepted_kwargs",
    "TrialConfig",
    "available_optimizers",
    "available_strategies",
    "build_meta_optimizer",
    "build_optimizer",
    "build_schedule",
    "check_optimizer_config",
    "check_val_loss_alignment",
    "default_config",
    "optimizer_class",
    "optimizer_defaults",
    "register_strategy",
    "resolve_config",
    "strategy_factory",
    "trial_meta_defaults",
    "wrap_optimizer",
]
