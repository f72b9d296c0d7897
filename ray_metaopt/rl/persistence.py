"""Saving and loading learned policies, and the small storage layer the actor checkpoints through.

A policy file is one ``torch.save`` of plain data and tensors (``torch.load(...,
weights_only=True)`` reads it)::

    {"format": "ray_metaopt.policy", "format_version": 1,
     "config": {...PolicyConfig...}, "weights": {name: tensor}, "optimizer": {...},
     "baseline_ema": {...}, "version": int, "updates": int, ...}

Paths are local paths or URIs that ``pyarrow.fs`` understands (``s3://``, ``gs://``, ``hdfs://``,
``file://``): the same storage Ray Train/Tune write checkpoints to. pyarrow is installed with
``ray[tune]`` and imported only when a URI is used.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import torch

from .features import GLOBAL_FEATURES, GROUP_FEATURES
from .policy import PolicyConfig

FEATURE_LAYOUT = [*GLOBAL_FEATURES, *GROUP_FEATURES]

POLICY_FORMAT = "ray_metaopt.policy"
POLICY_FORMAT_VERSION = 1


def _is_uri(path: str) -> bool:
    return "://" in path


def _check_path(path: Any) -> str:
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise TypeError(f"path must be a non-empty str or os.PathLike, got path={path!r}")
    return path


def join(base: str, name: str) -> str:
    """``base/name`` for local paths and URIs alike."""
    return base.rstrip("/") + "/" + name if _is_uri(base) else os.path.join(base, name)


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a reader sees the old file or the new one)."""
    path = _check_path(path)
    if _is_uri(path):
        import pyarrow.fs

        fs, fs_path = pyarrow.fs.FileSystem.from_uri(path)
        parent = fs_path.rsplit("/", 1)[0]
        if parent:
            fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(fs_path + ".tmp") as out:
            out.write(data)
        fs.move(fs_path + ".tmp", fs_path)
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_bytes(path: str) -> bytes | None:
    """The bytes at ``path``, or ``None`` when there is no such file."""
    path = _check_path(path)
    if _is_uri(path):
        import pyarrow.fs

        fs, fs_path = pyarrow.fs.FileSystem.from_uri(path)
        if fs.get_file_info(fs_path).type == pyarrow.fs.FileType.NotFound:
            return None
        with fs.open_input_stream(fs_path) as f:
            return f.read()
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return f.read()


def dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _policy_state_of(source: Any) -> dict[str, Any]:
    # Imported here: the actor module imports this one.
    from .actor import PolicyActor
    from .meta_optimizer import RLMetaOptimizer
    from .reinforce import Learner

    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, RLMetaOptimizer):
        return source.policy_state()
    if isinstance(source, (PolicyActor, Learner)):
        return policy_state_from_learner(source.learner if isinstance(source, PolicyActor) else source)
    if hasattr(source, "policy_state") and hasattr(source.policy_state, "remote"):  # a Ray actor handle
        import ray

        return ray.get(source.policy_state.remote())
    raise TypeError(
        "save_policy saves an RLMetaOptimizer, a PolicyActor (or its Ray handle), a Learner or a policy "
        f"state dict, got {type(source).__name__}"
    )


def policy_state_from_learner(learner: Any, **extra: Any) -> dict[str, Any]:
    """The policy-file dict of a :class:`~ray_metaopt.rl.reinforce.Learner`."""
    state = learner.state_dict()
    state.update(extra)
    state["features"] = list(FEATURE_LAYOUT)
    state["format"] = POLICY_FORMAT
    state["format_version"] = POLICY_FORMAT_VERSION
    return state


def check_policy_state(state: Any) -> dict[str, Any]:
    """Validate a policy dict (from a file or an actor); returns it. Raises ``ValueError``."""
    if not isinstance(state, Mapping) or state.get("format") != POLICY_FORMAT:
        raise ValueError(f"not a ray_metaopt policy (expected format={POLICY_FORMAT!r})")
    if state.get("format_version") != POLICY_FORMAT_VERSION:
        raise ValueError(
            f"policy format_version {state.get('format_version')!r} is not supported "
            f"(this version reads {POLICY_FORMAT_VERSION})"
        )
    layout = state.get("features")
    if layout is not None and list(layout) != FEATURE_LAYOUT:
        raise ValueError(
            f"the policy was trained on another state layout: features={list(layout)!r}, this version's "
            f"is {FEATURE_LAYOUT!r}"
        )
    config = PolicyConfig.from_dict(state["config"])
    from .policy import PolicyNetwork

    expected = PolicyNetwork(config).state_dict()
    if set(state["weights"]) != set(expected):
        raise ValueError(f"policy weights have keys {sorted(state['weights'])}, expected {sorted(expected)}")
    for name, tensor in expected.items():
        got = tuple(getattr(state["weights"][name], "shape", ()))
        if got != tuple(tensor.shape):
            raise ValueError(
                f"policy weight {name!r} has shape {got}, expected {tuple(tensor.shape)} (another action space "
                f"or state layout: state_dim={config.state_dim}, lr_actions={list(config.lr_actions)}, "
                f"wd_actions={config.wd_actions and list(config.wd_actions)})"
            )
    return dict(state)


def save_policy(path: str | os.PathLike, source: Any) -> str:
    """Save a learned policy to ``path`` (local path or pyarrow URI). Returns the path.

    Args:
        path: where to write (parent directories are created).
        source: an :class:`~ray_metaopt.rl.RLMetaOptimizer`, a :class:`~ray_metaopt.rl.PolicyActor`
            handle (from :func:`~ray_metaopt.rl.start_policy_actor`), or a policy dict from
            ``policy_state()``.

    Example:
        >>> save_policy("/tmp/policy.pt", actor_handle)
        >>> meta = RLMetaOptimizer(policy_path="/tmp/policy.pt", frozen=True, greedy=True)
    """
    path = _check_path(path)
    state = check_policy_state(_policy_state_of(source))
    write_bytes(path, dumps(state))
    return path


def load_policy(path: str | os.PathLike) -> dict[str, Any]:
    """Load a policy saved by :func:`save_policy` (``torch.load(..., weights_only=True)``).

    Example:
        >>> state = load_policy("/tmp/policy.pt"); state["config"]["lr_actions"]
        [0.5, 1.0, 2.0]
    """
    path = _check_path(path)
    data = read_bytes(path)
    if data is None:
        raise FileNotFoundError(f"no policy file at {path!r}")
    try:
        state = loads(data)
    except Exception as exc:  # torch.load raises several types on bytes that are not its format
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path!r} is not a readable policy file ({type(exc).__name__}: {reason})") from None
    return check_policy_state(state)


def load_policy_for(config: PolicyConfig, path: str | os.PathLike, hint: str) -> dict[str, Any]:
    """Load the policy at ``path`` and check that its weights fit ``config``.

    Args:
        config: the config the weights must fit (action spaces, feature layout, sizes).
        path: the policy file.
        hint: what to do instead, appended to the error.

    Raises:
        ValueError: ``"policy_path='p.pt' holds a policy with lr_actions=[0.5, 2.0] (here [0.5,
            1.0, 2.0]); {hint}"`` when they do not fit.
    """
    state = load_policy(path)
    config.require_compatible(
        PolicyConfig.from_dict(state["config"]), f"policy_path={os.fspath(path)!r} holds a policy with", hint
    )
    return state

