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


__all__ = ["available", "card", "policy_path"]
