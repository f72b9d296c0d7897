"""One place per strategy: its name, class, default monitor, search space and preset settings.

The provided trainable (``config["meta"]``), the CLI's ``--strategies``, the Tune search spaces
(:func:`~ray_metaopt.tune.meta_search_space`) and the benchmark's heuristic arms all read a
strategy from this registry, so adding one is its module plus one :func:`register_strategy` call.
The registry is per process: register where the Tune workers import it too (for example at the
bottom of the strategy's own module, and pass ``meta="module:Class"``, whose import registers it).

Example:
    >>> register_strategy(
    ...     "halve",
    ...     "my_package.rules:HalveOnPlateau",
    ...     summary="halve the lr when val_loss stalls",
    ...     monitor="val_loss",
    ...     search_space=lambda: {"patience": tune.randint(1, 5)},
    ...     preset=lambda ctx: {"meta_config": {"patience": ctx.patience}},
    ... )
    >>> strategy_spec("halve").monitor
    'val_loss'
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any, Callable

from .base import MetaOptimizer

FAMILIES = ("baseline", "heuristic", "rl")


def load_path(path: str, what: str) -> Any:
    """The object at ``"module:attr"``; a ``ValueError`` naming ``what`` if it cannot be imported."""
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{what}={path!r} could not be imported: {exc}") from exc


@dataclass(frozen=True)
class PresetContext:
    """What a strategy's preset settings may depend on.

    Args:
        eval_interval: steps between the trainable's evaluations (where ``val_loss`` exists).
        patience: plateau patience in evaluations (the CLI's 2; the benchmark scales it to the run).
        policy_name: the shared RL policy actor's name, when the run has one.
    """

    eval_interval: int
    patience: int = 2
    policy_name: str | None = None


@dataclass(frozen=True)
class StrategySpec:
    """A strategy as the trainable, the CLI, the search spaces and the benchmark see it.

    Args:
        name: the provided trainable's ``meta`` value.
        factory: a :class:`~ray_metaopt.MetaOptimizer` subclass or factory, or ``"module:attr"``
            imported on first use (so a strategy whose module fails to import only breaks the
            trials that use it).
        summary: one line for ``ray-metaopt --help`` and the benchmark report.
        monitor: the metric the provided trainable makes it watch unless ``meta_config`` says
            otherwise (``"val_loss"``: decide at evaluations on the validation loss); ``None``
            keeps the strategy's own default.
        search_space: a function with no arguments returning a fresh dict of Tune domains over
            its constructor arguments (or ``"module:attr"`` of one); ``None``: no tunable knobs.
        preset: the settings ``ray-metaopt`` and the benchmark run it with: a function of a
            :class:`PresetContext` returning the trainable config's part (``meta_config`` and any
            top-level keys, e.g. ``metric_reduction``); ``None``: not offered by them.
        tasks: the built-in tasks it makes sense on (``None``: all), e.g. ``("moe",)``.
        family: ``"heuristic"`` (the benchmark runs its preset as an arm), ``"baseline"`` or
            ``"rl"`` (the benchmark has its own protocol for those).
    """

    name: str
    factory: Callable[..., MetaOptimizer] | str
    summary: str = ""
    monitor: str | None = None
    search_space: Callable[[], dict[str, Any]] | str | None = None
    preset: Callable[[PresetContext], dict[str, Any]] | None = None
    tasks: tuple[str, ...] | None = None
    family: str = "heuristic"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or ":" in self.name:
            raise ValueError(f"name must be a non-empty str without ':', got name={self.name!r}")
        if not (callable(self.factory) or (isinstance(self.factory, str) and ":" in self.factory)):
            raise TypeError(f"factory must be a callable or a 'module:attr' path, got factory={self.factory!r}")
        if self.monitor is not None and (not isinstance(self.monitor, str) or not self.monitor):
            raise ValueError(f"monitor must be a metric name or None, got monitor={self.monitor!r}")
        space = self.search_space
        if space is not None and not (callable(space) or (isinstance(space, str) and ":" in space)):
            raise TypeError(f"search_space must be a callable, 'module:attr' or None, got search_space={space!r}")
        if self.preset is not None and not callable(self.preset):
            raise TypeError(f"preset must be a callable or None, got preset={self.preset!r}")
        if self.tasks is not None and (
            isinstance(self.tasks, str) or not all(isinstance(t, str) for t in self.tasks)
        ):
            raise TypeError(f"tasks must be a tuple of task names or None, got tasks={self.tasks!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {list(FAMILIES)}, got family={self.family!r}")

    def load_factory(self) -> Callable[..., MetaOptimizer]:
        """The strategy's class or factory (imported now if it was given as a path)."""
        if isinstance(self.factory, str):
            return load_path(self.factory, f"meta={self.name!r} ->")
        return self.factory

    def space(self) -> dict[str, Any]:
        """A fresh dict of its Tune search domains (``{}`` if it has none)."""
        fn = self.search_space
        if fn is None:
            return {}
        if isinstance(fn, str):
            fn = load_path(fn, f"search_space of {self.name!r}")
        space = fn()
        if not isinstance(space, dict):
            raise TypeError(f"search_space of {self.name!r} must return a dict, got {space!r}")
        return space

    def preset_config(self, ctx: PresetContext) -> dict[str, Any]:
        """Its preset trainable-config part for ``ctx`` (``meta`` included), a fresh dict."""
        if self.preset is None:
            raise ValueError(f"strategy {self.name!r} has no preset settings")
        part = dict(self.preset(ctx))
        part["meta_config"] = dict(part.get("meta_config", {}))
        return {"meta": self.name, **part}


def _plateau_preset(ctx: PresetContext) -> dict[str, Any]:
    return {"meta_config": {"patience": ctx.patience, "lr_factor": 0.5, "threshold": 1e-3}}


def _advanced_plateau_preset(ctx: PresetContext) -> dict[str, Any]:
    # Warmup decides at every step, where there is no val_loss: this preset monitors the training
    # loss averaged over each interval (and sees val_loss for its overfitting-gap criterion); one
    # evaluation interval of warmup keeps later decisions on evaluation steps. The ramp from 0.1
    # is what the benchmarks of this preset measured (it was the class default until the grace period).
    config = _plateau_preset(ctx)["meta_config"]
    config.update({"trend_window": 4, "criteria": "any", "monitor": "loss", "warmup_steps": ctx.eval_interval,
                   "warmup_start_factor": 0.1})
    return {"meta_config": config, "metric_reduction": "mean"}


def _smart_expert_gate_preset(ctx: PresetContext) -> dict[str, Any]:
    return {
        "meta_config": {
            "gate_lr_factor": 0.1,
            "expert_lr_factor": 1.0,
            "entropy_threshold": 0.8,
            "sparsity_target": 0.7,
            "specialization_bonus": 1.2,
        }
    }


def _rl_preset(ctx: PresetContext) -> dict[str, Any]:
    config: dict[str, Any] = {"update_frequency": max(1, ctx.eval_interval // 5)}
    if ctx.policy_name is not None:
        config["shared_policy"] = ctx.policy_name
    return {"meta_config": config}


def _rl_pretrained_preset(ctx: PresetContext) -> dict[str, Any]:
    # Trained deciding every 10 steps between evaluations every 20: the same ratio here.
    return {"meta_config": {"update_frequency": max(1, ctx.eval_interval // 2)}}


_SPACES = "ray_metaopt.tune.search_space"

_REGISTRY: dict[str, StrategySpec] = {}


def register_strategy(
    name: str | StrategySpec,
    factory: Callable[..., MetaOptimizer] | str | None = None,
    *,
    overwrite: bool = False,
    **spec: Any,
) -> StrategySpec:
    """Make a strategy available as ``config["meta"] = name`` everywhere (see the module doc).

    Args:
        name: its name, or a whole :class:`StrategySpec`.
        factory: its class / factory or ``"module:Class"`` (with a name).
        overwrite: replace a strategy already registered under that name.
        **spec: the other :class:`StrategySpec` fields (``summary``, ``monitor``,
            ``search_space``, ``preset``, ``tasks``, ``family``).

    Returns:
        The registered spec.

    Example:
        >>> register_strategy("halve", HalveEvery100Steps, summary="halve the lr every 100 steps")
    """
    if isinstance(name, StrategySpec):
        if factory is not None or spec:
            raise TypeError("pass either a StrategySpec or a name with its fields, not both")
        entry = name
    else:
        if factory is None:
            raise TypeError(f"register_strategy({name!r}) needs a factory (a class or 'module:Class')")
        entry = StrategySpec(name, factory, **spec)
    if entry.name in _REGISTRY and not overwrite:
        raise ValueError(f"a strategy named {entry.name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[entry.name] = entry
    return entry


def unregister_strategy(name: str) -> None:
    """Remove a registered strategy (a ``KeyError`` naming it if there is none)."""
    if name not in _REGISTRY:
        raise KeyError(f"no strategy named {name!r} is registered; registered: {strategy_names()}")
    del _REGISTRY[name]


def strategy_names() -> list[str]:
    """Names accepted as ``config["meta"]``, in registration order."""
    return list(_REGISTRY)


def strategy_specs() -> list[StrategySpec]:
    """Every registered :class:`StrategySpec`, in registration order."""
    return list(_REGISTRY.values())


def strategy_spec(meta: Any) -> StrategySpec | None:
    """The spec of a strategy name, registered factory or ``"module:attr"`` path (``None``: unregistered).

    A path is imported first, so a module that registers its strategy at import is found by it.
    """
    if isinstance(meta, str) and meta in _REGISTRY:
        return _REGISTRY[meta]
    if isinstance(meta, str) and ":" in meta:
        for entry in _REGISTRY.values():
            if entry.factory == meta:
                return entry
        meta = load_path(meta, "meta")
    if callable(meta):
        for entry in _REGISTRY.values():
            if entry.factory is meta or (isinstance(entry.factory, str) and _loaded_is(entry.factory, meta)):
                return entry
    return None


def _loaded_is(path: str, obj: Any) -> bool:
    # Only modules already imported: looking up a spec must not import every strategy's module.
    module, _, attr = path.partition(":")
    loaded = sys.modules.get(module)
    return loaded is not None and getattr(loaded, attr, None) is obj


def resolve_strategy(meta: Any) -> tuple[str, Callable[..., MetaOptimizer]]:
    """``(name, factory)`` of a strategy name, class / factory or ``"module:Class"`` path."""
    if callable(meta):
        entry = strategy_spec(meta)
        return (entry.name if entry else getattr(meta, "__name__", "custom")), meta
    if not isinstance(meta, str):
        raise TypeError(
            f"meta must be a strategy name, a MetaOptimizer subclass or 'module:Class', got meta={meta!r}"
        )
    if meta in _REGISTRY:
        return meta, _REGISTRY[meta].load_factory()
    if ":" in meta:
        return meta.rpartition(":")[2], load_path(meta, "meta")
    raise ValueError(f"meta must be one of {strategy_names()} (or 'module:Class'), got meta={meta!r}")


def default_monitor(meta: Any) -> str | None:
    """The metric the provided trainable makes ``meta`` watch (its spec's ``monitor``), if any."""
    entry = strategy_spec(meta)
    return entry.monitor if entry is not None else None


def preset_strategies(*, task: str | None = None, family: str | None = None) -> list[StrategySpec]:
    """The registered strategies with preset settings, optionally those of one family / usable on ``task``."""
    return [
        e for e in _REGISTRY.values()
        if e.preset is not None
        and (family is None or e.family == family)
        and (task is None or e.tasks is None or task in e.tasks)
    ]


def _defaults_only(ctx: PresetContext) -> dict[str, Any]:
    """A preset that sets nothing: the strategy at the trainable's defaults."""
    return {}


for _entry in (
    StrategySpec("none", "ray_metaopt.training.builders:FixedHyperparameters",
                 "the optimizer alone (constant lr): the baseline", family="baseline", preset=_defaults_only),
    StrategySpec("plateau", "ray_metaopt.plateau:PlateauMetaOptimizer",
                 "PlateauMetaOptimizer: lr x0.5 when val_loss has not improved for `patience` evaluations", monitor="val_loss",
                 search_space=f"{_SPACES}:plateau_space", preset=_plateau_preset),
    StrategySpec("advanced_plateau", "ray_metaopt.plateau:AdvancedPlateauMetaOptimizer",
                 "AdvancedPlateauMetaOptimizer: plateau + loss trend + warmup + overfitting gap",
                 monitor="val_loss", search_space=f"{_SPACES}:advanced_plateau_space",
                 preset=_advanced_plateau_preset),
    StrategySpec("expert_gate", "ray_metaopt.expert_gate:ExpertGateMetaOptimizer",
                 "ExpertGateMetaOptimizer: separate gate/expert lrs (MoE task only)",
                 search_space=f"{_SPACES}:expert_gate_space", preset=_defaults_only, tasks=("moe",)),
    StrategySpec("smart_expert_gate", "ray_metaopt.expert_gate:SmartExpertGateMetaOptimizer",
                 "SmartExpertGateMetaOptimizer: entropy/sparsity/specialization (MoE task only)",
                 search_space=f"{_SPACES}:smart_expert_gate_space", preset=_smart_expert_gate_preset,
                 tasks=("moe",)),
    StrategySpec("rl", "ray_metaopt.rl:RLMetaOptimizer",
                 "RLMetaOptimizer: a REINFORCE policy shared by every rl trial through a Ray actor, multiplying "
                 "the --rl-base schedule's lr (default cosine) by x0.5/x1/x2 at each decision",
                 search_space=f"{_SPACES}:rl_space", preset=_rl_preset, family="rl"),
    StrategySpec("rl_pretrained", "ray_metaopt.rl.pretrained:meta_optimizer",
                 "the shipped RL policy anchored-cosine-v1, frozen: no training, multiplies the --rl-base "
                 "schedule's lr (measured x0.80-x1.00 of that schedule's final loss on three tasks, "
                 "ray_metaopt/rl/pretrained/anchored-cosine-v1.md)",
                 preset=_rl_pretrained_preset, family="rl"),
):
    register_strategy(_entry)
