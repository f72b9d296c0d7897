"""Policies that ship with the package, by name, each with a card (``<name>.md``) beside it.

A shipped policy is an ordinary policy file (:func:`~ray_metaopt.rl.load_policy` reads it with
``weights_only=True``), trained by ``ray-metaopt train-policy``; its card says on which tasks, lrs
and seeds, with which command, and what it measured on tasks it did not train on.

Example:
    >>> from ray_metaopt.rl import RLMetaOptimizer, pretrained
    >>> pretrained.available()
    ['anchored-cosine-v1']
    >>> meta = RLMetaOptimizer.from_pretrained("anchored-cosine-v1", total_steps=1000)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

DEFAULT = "anchored-cosine-v1"
_HERE = os.path.dirname(os.path.abspath(__file__))


def available() -> list[str]:
    """The names of the shipped policies."""
    return sorted(name[:-3] for name in os.listdir(_HERE) if name.endswith(".pt"))


def policy_path(name: str) -> str:
    """The file of the shipped policy ``name`` (for ``policy_path=`` in a trainable's ``meta_config``).

    Raises:
        ValueError: ``name`` is not a shipped policy; the message lists the shipped ones.
    """
    if not isinstance(name, str) or name not in available():
        raise ValueError(f"no pretrained policy named {name!r}; shipped: {available()}")
    return os.path.join(_HERE, f"{name}.pt")


def card(name: str) -> str:
    """The card of the shipped policy ``name`` (Markdown): what it was trained on and what it measured."""
    with open(os.path.splitext(policy_path(name))[0] + ".md") as f:
        return f.read()


def meta_optimizer(
    name: str = DEFAULT,
    *,
    update_frequency: int = 10,
    total_steps: int | None = None,
    seed: int | None = None,
    frozen: bool = True,
    frozen_action: str | None = None,
    on_stop: Callable[[str], Any] | None = None,
) -> Any:
    """:meth:`RLMetaOptimizer.from_pretrained <ray_metaopt.rl.RLMetaOptimizer.from_pretrained>` with
    the arguments a trainable passes: the ``rl_pretrained`` strategy's factory.

    Args:
        name: the shipped policy.
        update_frequency: decide every this many steps (the shipped policies: 10, half the
            benchmark's evaluation interval; the ``rl_pretrained`` preset uses that ratio).
        total_steps: the run's length (its progress feature; the provided trainable sets it).
        seed, frozen, frozen_action, on_stop: as for :class:`~ray_metaopt.rl.RLMetaOptimizer`.

    Example:
        >>> meta = meta_optimizer(total_steps=2000)   # frozen, acting on the optimizer's schedule
    """
    from ..meta_optimizer import RLMetaOptimizer

    return RLMetaOptimizer.from_pretrained(
        name, update_frequency=update_frequency, total_steps=total_steps, seed=seed, frozen=frozen,
        frozen_action=frozen_action, on_stop=on_stop,
    )


__all__ = ["DEFAULT", "available", "card", "meta_optimizer", "policy_path"]
