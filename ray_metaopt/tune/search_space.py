"""The meta-optimizers' own hyperparameters as Ray Tune search spaces.

Every strategy has knobs of its own (a plateau's ``patience`` and ``lr_factor``, the RL policy's
``policy_lr``...). :func:`meta_search_space` returns them as a dict of Tune domains
(``tune.loguniform``, ``tune.randint``, ``tune.choice``...), ready to be the ``meta_config`` of
the provided trainable, so any Tune searcher (random/grid search, Optuna, HyperOpt, BOHB...)
tunes them like any other hyperparameter. Every value a space can produce is a valid argument of
the strategy's constructor (the tests sample each space many times and build the strategy).

Example:
    >>> from ray import tune
    >>> from ray_metaopt.tune import meta_search_space, metaopt_trainable
    >>> param_space = {"task": "teacher_student", "meta": "plateau",
    ...                "eval_interval": 20,
    ...                "meta_config": meta_search_space("plateau", eval_interval=20)}
    >>> tuner = tune.Tuner(metaopt_trainable, param_space=param_space,
    ...                    tune_config=tune.TuneConfig(metric="val_loss", mode="min", num_samples=8))
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from ray import tune
from ray.tune.search.sample import Domain

from .._validation import check_choice, check_int
from ..registry import default_monitor, register_strategy, strategy_names, strategy_spec

# Each builder returns a fresh dict (Tune domains are mutable objects: never share one).
_SpaceFn = Callable[[], dict[str, Any]]


def plateau_space() -> dict[str, Any]:
    return {
        # Counts are in decisions (one per ``update_frequency`` steps).
        "patience": tune.randint(1, 11),
        "lr_factor": tune.uniform(0.1, 0.8),
        "threshold": tune.loguniform(1e-4, 5e-2),
        "cooldown": tune.randint(0, 4),
        # No update_frequency: the provided trainable makes these strategies watch val_loss and
        # decide at its evaluations (update_frequency = eval_interval); ``eval_interval=`` of
        # meta_search_space adds a choice of multiples of it.
    }


def advanced_plateau_space() -> dict[str, Any]:
    space = plateau_space()
    space.update(
        {
            "grad_norm_threshold": tune.loguniform(1.0, 100.0),
            "weight_decay_factor": tune.uniform(1.05, 2.0),
            "warmup_steps": tune.choice([0, 10, 50, 100]),
            "warmup_start_factor": tune.choice([0.1, 1.0]),  # an lr ramp, or only a grace period
            "trend_window": tune.randint(3, 11),
            "criteria": tune.choice(["all", "any"]),
        }
    )
    return space


def expert_gate_space() -> dict[str, Any]:
    return {
        "gate_lr_factor": tune.loguniform(0.01, 1.0),
        "expert_lr_factor": tune.uniform(0.5, 1.5),
        "entropy_threshold": tune.uniform(0.3, 0.95),
        "adjustment_rate": tune.loguniform(0.02, 0.5),
        "update_frequency": tune.choice([1, 5, 10, 20]),
    }


def smart_expert_gate_space() -> dict[str, Any]:
    space = expert_gate_space()
    space.update(
        {
            "sparsity_target": tune.uniform(0.3, 0.9),
            "specialization_bonus": tune.uniform(1.0, 1.5),
        }
    )
    return space


# RLMetaOptimizer arguments that configure the policy itself. With a shared policy the actor
# owns them (``MetaOptCallback(policy_config=...)``): they must match in every trial
# (lr_actions, hidden_size) or are used only by the actor's learner (policy_lr, ...).
RL_POLICY_KEYS = ("policy_lr", "entropy_weight", "gamma", "hidden_size", "lr_actions")


def rl_space() -> dict[str, Any]:
    return {
        "update_frequency": tune.choice([5, 10, 20]),
        "policy_lr": tune.loguniform(1e-5, 1e-2),
        "entropy_weight": tune.loguniform(1e-4, 1e-1),
        "gamma": tune.uniform(0.8, 0.99),
        "hidden_size": tune.choice([16, 32, 64]),
        # Lists as categories: fine for random/grid search; a searcher that needs scalar
        # categories (Optuna) can drop this key with ``exclude=("lr_actions",)``.
        "lr_actions": tune.choice([[0.5, 1.0, 2.0], [0.7, 1.0, 1.4], [0.5, 0.8, 1.0, 1.25, 2.0]]),
    }


def meta_search_space_names() -> tuple[str, ...]:
    """The strategy names :func:`meta_search_space` knows: every registered strategy
    (:func:`ray_metaopt.registry.register_strategy`; one without a ``search_space`` has ``{}``)."""
    return tuple(strategy_names())


def register_meta_search_space(name: str, space_fn: _SpaceFn) -> None:
    """Set the search space of a registered strategy (deprecated: pass ``search_space=`` to
    :func:`~ray_metaopt.registry.register_strategy`, where the strategy is declared once).

    Args:
        name: the strategy's registered name (as in the trainable's ``meta`` key).
        space_fn: a function with no arguments returning a fresh ``dict`` of Tune domains/values.

    Example:
        >>> register_meta_search_space("my_strategy", lambda: {"alpha": tune.uniform(0, 1)})
    """
    warnings.warn(
        "register_meta_search_space is deprecated; pass search_space= to ray_metaopt.register_strategy",
        DeprecationWarning,
        stacklevel=2,
    )
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got name={name!r}")
    if not callable(space_fn):
        raise TypeError(f"space_fn must be callable, got space_fn={space_fn!r}")
    entry = strategy_spec(name)
    if entry is None or entry.name != name:
        raise ValueError(
            f"name={name!r} is not a registered strategy (registered: {strategy_names()}); "
            "register it with ray_metaopt.register_strategy(name, factory, search_space=...)"
        )
    register_strategy(replace(entry, search_space=space_fn), overwrite=True)


def meta_search_space(
    strategy: str,
    *,
    exclude: tuple[str, ...] | list[str] = (),
    eval_interval: int | None = None,
    **fixed: Any,
) -> dict[str, Any]:
    """The tunable hyperparameters of ``strategy`` as a dict of Tune search domains.

    Args:
        strategy: one of :func:`meta_search_space_names` (``"plateau"``, ``"advanced_plateau"``,
            ``"expert_gate"``, ``"smart_expert_gate"``, ``"rl"``, ``"none"``).
        exclude: keys to leave out (the strategy's default is used for them).
        eval_interval: the trainable's ``eval_interval``. The plateau strategies watch
            ``val_loss`` in the provided trainable, which exists only at evaluations, so their
            space has no ``update_frequency`` (the trainable sets it to ``eval_interval``); give
            ``eval_interval`` to search ``update_frequency`` over 1, 2 and 5 evaluations instead.
            Every sample of every space then builds a valid trial.
        **fixed: values (or your own domains) that replace or add to the default space, e.g.
            ``monitor="val_loss"``, ``min_lr=1e-6`` or ``patience=tune.randint(2, 5)``.
            ``monitor="val_loss"`` needs a fixed ``update_frequency`` equal to the trainable's
            ``eval_interval``: the provided trainable gives the strategy ``val_loss`` only at
            evaluation steps, so a decision anywhere else would miss it (a ``ValueError``
            says so here instead of failing trials later).
            For ``"rl"``, ``shared_policy="<actor name>"`` leaves out the policy's own
            hyperparameters (:data:`RL_POLICY_KEYS`): the shared actor owns them, so tune them
            per experiment through ``MetaOptCallback(policy_config=...)``, not per trial.

    Returns:
        A new dict usable as ``meta_config`` in a ``param_space`` / ``config``.

    Example:
        >>> space = meta_search_space("plateau", eval_interval=20, exclude=("cooldown",))
        >>> sorted(space)
        ['lr_factor', 'patience', 'threshold', 'update_frequency']
    """
    check_choice("strategy", strategy, tuple(strategy_names()))
    if eval_interval is not None:
        check_int("eval_interval", eval_interval, minimum=1)
    space = strategy_spec(strategy).space()
    # The provided trainable makes a strategy watch its registered monitor (val_loss: the plateau
    # strategies) unless `monitor` says otherwise.
    monitor = default_monitor(strategy)
    if eval_interval is not None and monitor == "val_loss":
        space["update_frequency"] = tune.choice([k * eval_interval for k in (1, 2, 5)])
    if strategy == "rl" and fixed.get("shared_policy") is not None:
        for key in RL_POLICY_KEYS:
            if key not in fixed:
                space.pop(key, None)
    if isinstance(exclude, str):
        raise TypeError(f"exclude must be a list of keys, got exclude={exclude!r}")
    unknown = sorted(set(exclude) - set(space))
    if unknown:
        raise ValueError(
            f"exclude names keys that are not in the {strategy!r} space: {unknown}; keys are {sorted(space)}"
        )
    for key in exclude:
        del space[key]
    space.update(fixed)
    watches_val_loss = space.get("monitor", monitor) == "val_loss"
    searched = isinstance(space.get("update_frequency"), Domain) and "update_frequency" in fixed
    if watches_val_loss and searched:
        raise ValueError(
            "monitor='val_loss' needs update_frequency fixed to the trainable's eval_interval (val_loss "
            "only exists at evaluation steps), got a searched update_frequency; pass update_frequency=<eval_interval>, or eval_interval=<eval_interval> to search multiples of it"
        )
    return space


def preset_grid(presets: Mapping[Any, Mapping[str, Any]], key: str) -> dict[str, Any]:
    """A ``param_space`` that grid-searches ``key`` over the names of ``presets`` (in order), each
    trial getting its preset's config keys; a key some presets set and others do not gets the
    provided trainable's default in the others.

    Example:
        >>> space = preset_grid({"plain": {"meta": "none"}, "plateau": {"meta": "plateau"}}, "_strategy")
        >>> tune.Tuner(metaopt_trainable, param_space={**space, "seed": tune.grid_search([0, 1])})  # 4 trials
    """
    from ..training.builders import default_config

    defaults = default_config()
    keys = sorted({k for preset in presets.values() for k in preset})
    table = {name: {k: preset.get(k, defaults.get(k)) for k in keys} for name, preset in presets.items()}
    space: dict[str, Any] = {key: tune.grid_search(list(table))}
    for k in keys:
        space[k] = tune.sample_from(lambda config, k=k: table[config[key]][k])
    return space


def sample_meta_config(space: Mapping[str, Any], *, seed: int | None = None) -> dict[str, Any]:
    """Draw one concrete ``meta_config`` from ``space`` with Tune's own samplers.

    Plain (non-domain) values are copied as they are. Useful to check a space offline or to
    build a strategy outside Tune.

    Example:
        >>> config = sample_meta_config(meta_search_space("plateau"), seed=0)
        >>> PlateauMetaOptimizer(**config)  # doctest: +SKIP
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    config = {}
    for key, value in space.items():
        if isinstance(value, Domain):
            sample = value.sample(random_state=rng)
            config[key] = _plain(sample)
        else:
            config[key] = value
    return config


def _plain(value: Any) -> Any:
    """numpy scalars -> Python numbers, so configs stay plain data."""
    if hasattr(value, "item") and not isinstance(value, (list, dict)):
        return value.item()
    return value
