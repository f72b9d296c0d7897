"""Checkpoint files of a training run: model, wrapped optimizer (with the strategy), schedules, extras.

Everything is tensors or plain data (``torch.load(path, weights_only=True)`` loads it), and
nothing here needs Ray: the provided trainable and a user's own Tune function hand the directory
to ``tune.report``.

**Which value wins after a restore (PBT).** Loading an optimizer state dict restores the
hyperparameters that were saved, so by itself a PBT-perturbed ``lr`` would be silently lost.
:func:`load_checkpoint` takes the trial's current configured values (``hparams``) and, for each
one that differs from the value saved with the checkpoint (that is, PBT or you changed it):

- ``lr`` / ``weight_decay``: the configured value wins. Every param group is multiplied by one
  factor so that the reference group (the first whose freshly built value equals the configured
  one, usually group 0) gets exactly the configured value; the ratios between groups that the
  meta-optimizer set are kept, and the schedule anchors (the wrapper's initial values, the
  groups' ``initial_lr``, attached LR schedulers' ``base_lrs``) are scaled by the same factor,
  so warmup/cosine shapes and the strategy's bounds relative to initial values follow. With a
  schedule attached, the configured lr applies to the schedule's anchor (its peak) rather than
  to the current, already decayed value.
- any other optimizer hyperparameter (``momentum``, ``betas``, ``eps``...): set on every group.
- The meta-optimizer keeps its learning state (plateau counters, best value, RL statistics).

A value that equals the saved one (a plain resume, ``Tuner.restore``) changes nothing: the run
continues bit for bit.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..metrics import to_float
from ..wrapper import OptimizerWrapper
from .reporter import MetricsReporter, reporter_for

CHECKPOINT_FILE = "metaopt_state.pt"
REPORTER_FILE = "metaopt_reporter.json"  # written by report_metrics next to a checkpoint
_FORMAT = 1


def _numeric_hparams(hparams: Mapping[str, Any] | None) -> dict[str, Any]:
    out = {}
    for key, value in (hparams or {}).items():
        if isinstance(value, (bool, int, float)):
            out[str(key)] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            out[str(key)] = list(value)
    return out


def save_checkpoint(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    wrapper: OptimizerWrapper,
    *,
    hparams: Mapping[str, Any] | None = None,
    schedulers: Sequence[Any] = (),
    reporter: MetricsReporter | None = None,
    **extra: Any,
) -> str:
    """Write model, optimizer (with meta-optimizer and wrapper state) and ``extra`` to ``directory``.

    Everything is tensors or plain data: ``torch.load(path, weights_only=True)`` loads it.

    Args:
        directory: an existing directory (e.g. a ``tempfile.TemporaryDirectory()``).
        model: the model (its ``state_dict``).
        wrapper: the optimizer wrapper (optimizer + meta-optimizer + decision log).
        hparams: the trial's configured optimizer hyperparameters (``{"lr": config["lr"]}``),
            stored so that :func:`load_checkpoint` can tell a PBT perturbation from a resume.
        schedulers: LR schedulers to checkpoint with it.
        reporter: a reporter whose state is already that of the report this checkpoint goes
            with (the provided trainable's), stored in the checkpoint. Leave it out when the
            report comes after (:func:`report_metrics` with ``checkpoint_dir`` writes it then).
        extra: more plain data / tensors to store (``step=...``); returned by :func:`load_checkpoint`.

    Returns:
        The file's path.
    """
    state = {
        "format": _FORMAT,
        "model": model.state_dict(),
        "optimizer": wrapper.state_dict(),
        "schedulers": [s.state_dict() for s in schedulers],
        "hparams": _numeric_hparams(hparams),
        "reporter": reporter.state_dict() if reporter is not None else None,
        "extra": extra,
    }
    path = os.path.join(os.fspath(directory), CHECKPOINT_FILE)
    torch.save(state, path)
    return path


def load_checkpoint(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    wrapper: OptimizerWrapper,
    *,
    hparams: Mapping[str, Any] | None = None,
    schedulers: Sequence[Any] = (),
    reporter: MetricsReporter | None = None,
    map_location: str | torch.device | None = None,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; configured ``hparams`` that changed win (PBT).

    Call it after building the model and the optimizer from the trial's *current* config
    (whose param groups give the freshly configured values): see the module doc for the rule.

    Args:
        directory: the checkpoint directory.
        model: the model to load into.
        wrapper: the optimizer wrapper to load into.
        hparams: the trial's configured optimizer hyperparameters, as passed to ``save_checkpoint``.
        schedulers: the LR schedulers saved with it (same order).
        reporter: where the saved reporter state goes (from ``REPORTER_FILE`` if
            :func:`report_metrics` wrote one, else from the checkpoint); default
            :func:`reporter_for` ``(wrapper)``.
        map_location: where to load tensors (default: CPU; ``load_state_dict`` moves them).

    Returns:
        The ``extra`` entries saved with the checkpoint, plus ``"config_overrides"``: the list of
        configured hyperparameters that replaced the saved ones.
    """
    path = os.path.join(os.fspath(directory), CHECKPOINT_FILE)
    state = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    if state.get("format") != _FORMAT:
        raise ValueError(
            f"{path} is not a ray_metaopt checkpoint of format {_FORMAT} (got {state.get('format')!r})"
        )
    built = [dict(g) for g in wrapper.param_groups]  # freshly built from the current config
    model.load_state_dict(state["model"])
    optimizer_state = dict(state["optimizer"])
    meta_state = optimizer_state.get("meta_optimizer")
    if meta_state is not None and meta_state.get("type") != type(wrapper.meta_optimizer).__name__:
        # The strategy itself changed (e.g. PBT over `meta`): keep the new one fresh.
        optimizer_state.pop("meta_optimizer")
    wrapper.load_state_dict(optimizer_state)
    if len(schedulers) != len(state["schedulers"]):
        raise ValueError(
            f"{path} holds {len(state['schedulers'])} scheduler states, got {len(schedulers)} schedulers"
        )
    for scheduler, scheduler_state in zip(schedulers, state["schedulers"]):
        scheduler.load_state_dict(scheduler_state)
    overrides = []
    if hparams is not None:
        overrides = apply_config_hparams(
            wrapper, _numeric_hparams(hparams), state["hparams"], built, schedulers=schedulers
        )
    reporter_path = os.path.join(os.fspath(directory), REPORTER_FILE)
    saved = state.get("reporter")
    if os.path.exists(reporter_path):
        with open(reporter_path) as f:
            saved = json.load(f)
    if saved is not None:
        (reporter_for(wrapper) if reporter is None else reporter).load_state_dict(saved)
    return {**state["extra"], "config_overrides": overrides}


# --------------------------------------------------------------------------- the PBT rule
def _reference_group(built: Sequence[Mapping[str, Any]], key: str, value: float) -> int | None:
    candidates = [i for i, g in enumerate(built) if key in g]
    for i in candidates:
        if to_float(built[i][key]) == value:
            return i
    for i in candidates:
        if to_float(built[i][key]) > 0:
            return i
    return None


def apply_config_hparams(
    wrapper: OptimizerWrapper,
    configured: Mapping[str, Any],
    saved: Mapping[str, Any] | None,
    built: Sequence[Mapping[str, Any]],
    *,
    schedulers: Iterable[Any] = (),
) -> list[dict[str, Any]]:
    """Make configured hyperparameters that differ from the checkpoint's win (see the module doc).

    Args:
        wrapper: the optimizer wrapper, already loaded from the checkpoint.
        configured: the trial's current configured values (``{"lr": 2e-3, "momentum": 0.9}``).
        saved: the configured values stored with the checkpoint (``None``: unknown, nothing changes).
        built: the param groups as built from the current config, before loading.
        schedulers: attached LR schedulers whose ``base_lrs`` are anchors.

    Returns:
        One dict per changed hyperparameter: ``hparam``, ``saved``, ``configured``, ``factor``
        (``None`` where values were set rather than scaled).
    """
    schedulers = list(schedulers)
    changes = []
    for key, new in configured.items():
        if saved is None or key not in saved or saved[key] == new:
            continue
        groups = wrapper.param_groups
        if key in ("lr", "weight_decay") and isinstance(new, (int, float)) and math.isfinite(new):
            ref = _reference_group(built, key, float(new))
            if ref is None:
                continue
            if key == "lr" and schedulers and ref < len(schedulers[0].base_lrs):
                anchor = float(schedulers[0].base_lrs[ref])
            else:
                anchor = to_float(groups[ref][key])
            target = to_float(built[ref][key])
            factor = target / anchor if anchor > 0 and math.isfinite(anchor) else None
            for i, group in enumerate(groups):
                if key not in group:
                    continue
                fresh = to_float(built[i][key]) if i < len(built) and key in built[i] else to_float(group[key])
                _set(group, key, to_float(group[key]) * factor if factor is not None else fresh)
                if factor is not None:
                    wrapper.rescale_anchors(i, key, factor=factor, schedulers=schedulers)
                else:
                    wrapper.rescale_anchors(i, key, value=fresh, schedulers=schedulers)
        else:
            factor = None
            for group in wrapper.param_groups:
                if key in group:
                    group[key] = tuple(new) if isinstance(group[key], tuple) else new
        changes.append({"hparam": key, "saved": saved[key], "configured": new, "factor": factor})
    return changes


def _set(group: dict, key: str, value: float) -> None:
    if isinstance(group[key], torch.Tensor):
        group[key].fill_(value)
    else:
        group[key] = value


__all__ = ["CHECKPOINT_FILE", "REPORTER_FILE", "apply_config_hparams", "load_checkpoint", "save_checkpoint"]
