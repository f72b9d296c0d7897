"""Reporting and checkpoint helpers for Tune trainables, the provided one and your own.

The few lines a user adds to their own Tune function trainable::

    from ray import tune
    from ray_metaopt.tune.reporting import wrap_optimizer, report_metrics, save_checkpoint, restore_from_tune

    def train_fn(config):
        model = MyModel()
        opt = wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=config["lr"]),
                             "plateau", {"patience": 2, "monitor": "val_loss", "update_frequency": 50})
        start = restore_from_tune(model, opt, hparams={"lr": config["lr"]}).get("step", 0)
        for step in range(start, 1000):
            loss = ...; opt.zero_grad(); loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            metrics = {"loss": loss.detach(), "grad_norm": grad_norm}
            if (step + 1) % 50 == 0:
                metrics["val_loss"] = evaluate(model)
            opt.update_hyperparameters(metrics, step=step)
            if (step + 1) % 50 == 0:
                with tempfile.TemporaryDirectory() as d:
                    save_checkpoint(d, model, opt, hparams={"lr": config["lr"]}, step=step + 1)
                    report_metrics(opt, {"step": step + 1, "train_loss": loss.item(),
                                         "val_loss": metrics["val_loss"]}, checkpoint_dir=d)

:func:`report_metrics` adds the same metric names the provided trainable reports (``lr``,
``lr/<group>``, ``weight_decay/<group>``, ``meta/num_decisions``, ``meta/decisions``,
``best_val_loss``, ``diverged``, ``lr_at_floor``, ``steps_per_second``), so the package's Tune
callback and scheduler work on your trainable too.

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
import time
import weakref
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..base import MetaOptimizer
from ..metrics import to_float
from ..wrapper import OptimizerWrapper

CHECKPOINT_FILE = "metaopt_state.pt"
# Why a trial ended ("" while it runs): the trainable, MetaStopper and MetaAwareScheduler write it.
STOP_REASON_KEY = "stop_reason"
REPORTER_FILE = "metaopt_reporter.json"  # written by report_metrics next to a checkpoint
_FORMAT = 1


# --------------------------------------------------------------------------- wrapping
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
        from .builders import build_meta_optimizer

        strategy = build_meta_optimizer(meta, meta_config, total_steps=total_steps, seed=seed)
    wrapper = OptimizerWrapper(optimizer, strategy, metric_reduction=metric_reduction)
    reporter_for(wrapper).restart_timer(0)  # the first report's steps_per_second counts from here
    return wrapper


# --------------------------------------------------------------------------- metrics
def group_labels(param_groups: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each group's label in metric names: its ``name``, or its index when it has none (or shares it)."""
    names = [str(g.get("name") or "") for g in param_groups]
    return [n if n and names.count(n) == 1 else str(i) for i, n in enumerate(names)]


def hparam_metrics(wrapper: OptimizerWrapper) -> dict[str, Any]:
    """``lr`` (group 0), ``lr/<group>``, ``weight_decay/<group>`` and ``lr_at_floor``.

    ``<group>`` is the group's ``name``, or its index when it has none. ``lr_at_floor`` is true
    when every group's lr is at (or below) its lower bound in the meta-optimizer (``min_lr``).
    """
    out: dict[str, Any] = {}
    at_floor = True
    for state, label in zip(wrapper.group_states(), group_labels(wrapper.param_groups)):
        out[f"lr/{label}"] = state.lr
        if state.weight_decay is not None:
            out[f"weight_decay/{label}"] = state.weight_decay
        low, _ = wrapper.meta_optimizer.lr_bounds(state)
        at_floor = at_floor and state.lr <= low * (1 + 1e-9)
    out["lr"] = to_float(wrapper.param_groups[0]["lr"]) if wrapper.param_groups else math.nan
    out["lr_at_floor"] = bool(at_floor and wrapper.param_groups)
    return out


class MetricsReporter:
    """Builds the result dict of one report: the trial's numbers plus the wrapper's hyperparameters.

    Keeps what a result needs across reports (best validation loss, decisions already reported,
    time and step of the last report); :meth:`state_dict` goes into checkpoints so a resumed trial
    continues ``best_val_loss`` and ``meta/decisions`` where it stopped.

    Args:
        wrapper: the optimizer wrapper whose hyperparameters and decisions to report.
        prefix: namespace of task-specific extras (``"moe"`` -> ``moe/routing_entropy``).
        constants: task facts reported with every result (under ``prefix``).

    Example:
        >>> reporter = MetricsReporter(wrapper, prefix="digits")
        >>> result = reporter.metrics(step=100, train_loss=0.3, val_loss=0.4, extras={"val_accuracy": 0.9})
        >>> result["best_val_loss"], result["digits/val_accuracy"]
        (0.4, 0.9)
    """

    def __init__(
        self,
        wrapper: OptimizerWrapper,
        *,
        prefix: str | None = None,
        constants: Mapping[str, float] | None = None,
    ) -> None:
        if not isinstance(wrapper, OptimizerWrapper):
            raise TypeError(f"wrapper must be an OptimizerWrapper, got wrapper={wrapper!r}")
        self.wrapper = wrapper
        self.prefix = prefix
        self.constants = dict(constants or {})
        self.best_val_loss = math.inf
        self.reported_decisions = 0  # the first report lists every decision made before it
        self._last_time: float | None = None
        self._last_step: int | None = None

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def metrics(
        self,
        *,
        step: int,
        train_loss: float,
        val_loss: float,
        extras: Mapping[str, Any] | None = None,
        diverged: bool | None = None,
    ) -> dict[str, Any]:
        """The result dict for a report at ``step`` (call once per report: it advances the counters).

        ``diverged`` defaults to "``train_loss`` or ``val_loss`` is not finite".
        """
        train_loss, val_loss = to_float(train_loss), to_float(val_loss)
        if diverged is None:
            diverged = not (math.isfinite(train_loss) and math.isfinite(val_loss))
        if math.isfinite(val_loss):
            self.best_val_loss = min(self.best_val_loss, val_loss)
        now = time.perf_counter()
        if self._last_time is not None and self._last_step is not None and now > self._last_time:
            steps_per_second = (step - self._last_step) / (now - self._last_time)
        else:
            steps_per_second = math.nan
        self._last_time, self._last_step = now, step

        log = self.wrapper.log
        new = log.num_decisions - self.reported_decisions
        recent = list(log)[-new:] if new > 0 else []
        self.reported_decisions = log.num_decisions

        result: dict[str, Any] = {
            "step": int(step),
            "train_loss": train_loss,
            "val_loss": val_loss,
            "best_val_loss": self.best_val_loss,
            "diverged": bool(diverged),
            "steps_per_second": steps_per_second,
            "meta/strategy": type(self.wrapper.meta_optimizer).__name__,
            "meta/num_decisions": log.num_decisions,
            "meta/num_skipped": log.num_skipped,
            "meta/decisions": [d.to_dict() for d in recent],
        }
        result.update(hparam_metrics(self.wrapper))
        for key, value in {**self.constants, **dict(extras or {})}.items():
            result[self._key(key)] = to_float(value) if isinstance(value, (torch.Tensor, float, int)) else value
        return result

    def restart_timer(self, step: int | None = None) -> None:
        """Measure the next ``steps_per_second`` from now and ``step`` (``None``: report NaN next).

        Call it when training (re)starts, so a restore's or a start-up's time is not counted.
        """
        self._last_time = time.perf_counter() if step is not None else None
        self._last_step = step

    def state_dict(self) -> dict[str, Any]:
        return {"best_val_loss": self.best_val_loss, "reported_decisions": self.reported_decisions}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_val_loss = float(state["best_val_loss"])
        self.reported_decisions = int(state["reported_decisions"])
        self.restart_timer()


_REPORTERS: "weakref.WeakKeyDictionary[OptimizerWrapper, MetricsReporter]" = weakref.WeakKeyDictionary()


def reporter_for(wrapper: OptimizerWrapper, *, prefix: str | None = None) -> MetricsReporter:
    """The :class:`MetricsReporter` that :func:`report_metrics` keeps for ``wrapper`` (made on first use).

    The function-style helpers (:func:`wrap_optimizer`, :func:`report_metrics`,
    :func:`restore_from_tune`) need a reporter that lives as long as the wrapper without the caller
    holding it; a caller that holds its own passes it as ``reporter=`` instead.
    :func:`save_checkpoint` never reads this map.
    """
    reporter = _REPORTERS.get(wrapper)
    if reporter is None:
        reporter = _REPORTERS[wrapper] = MetricsReporter(wrapper, prefix=prefix)
    return reporter


def tune_result(result: Mapping[str, Any]) -> dict[str, Any]:
    """``result`` as it goes to ``tune.report``: lists of dicts (``meta/decisions``,
    ``config_overrides``) become tuples.

    Tune's TensorBoard logger logs every non-empty list as a histogram and warns about a list of
    dicts; it leaves tuples alone, while the JSON and CSV loggers and Tune callbacks read them as
    they read lists.
    """
    return {
        k: tuple(v) if isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v) else v
        for k, v in result.items()
    }


def report_metrics(
    wrapper: OptimizerWrapper,
    metrics: Mapping[str, Any],
    checkpoint_dir: str | os.PathLike | None = None,
    *,
    reporter: MetricsReporter | None = None,
    report: bool = True,
) -> dict[str, Any]:
    """Report ``metrics`` plus the meta-optimizer's view to Tune (``ray.tune.report``).

    Args:
        wrapper: the trial's optimizer wrapper.
        metrics: at least ``step``, ``train_loss`` and ``val_loss``; any other keys are passed
            through unchanged (numbers or one-element tensors, which are read here).
        checkpoint_dir: a directory to report as the trial's checkpoint (e.g. filled by
            :func:`save_checkpoint` inside a ``tempfile.TemporaryDirectory()``). The reporter's
            state after this report is written there (``REPORTER_FILE``), its only copy.
        reporter: the reporter to use; default :func:`reporter_for` ``(wrapper)``.
        report: ``False`` builds and returns the dict without calling Tune (for tests/logging).

    Returns:
        The reported dict.

    Example:
        >>> report_metrics(opt, {"step": 100, "train_loss": 0.31, "val_loss": 0.35})
    """
    missing = [k for k in ("step", "train_loss", "val_loss") if k not in metrics]
    if missing:
        raise ValueError(f"metrics must contain 'step', 'train_loss' and 'val_loss'; missing {missing}")
    reporter = reporter_for(wrapper) if reporter is None else reporter
    extras = {k: v for k, v in metrics.items() if k not in ("step", "train_loss", "val_loss", "diverged")}
    result = reporter.metrics(
        step=int(metrics["step"]),
        train_loss=metrics["train_loss"],
        val_loss=metrics["val_loss"],
        diverged=metrics.get("diverged"),
    )
    result.update({k: to_float(v) if isinstance(v, torch.Tensor) else v for k, v in extras.items()})
    if checkpoint_dir is not None:
        # The checkpoint was written before this report: store the reporter's state as of after
        # it, so a resumed trial neither re-reports these decisions nor forgets this val_loss.
        with open(os.path.join(os.fspath(checkpoint_dir), REPORTER_FILE), "w") as f:
            json.dump(reporter.state_dict(), f)
    if report:
        from ray import tune

        checkpoint = (
            tune.Checkpoint.from_directory(os.fspath(checkpoint_dir)) if checkpoint_dir is not None else None
        )
        tune.report(tune_result(result), checkpoint=checkpoint)
    return result


# --------------------------------------------------------------------------- checkpoints
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


def restore_from_tune(
    model: torch.nn.Module,
    wrapper: OptimizerWrapper,
    *,
    hparams: Mapping[str, Any] | None = None,
    schedulers: Sequence[Any] = (),
) -> dict[str, Any]:
    """:func:`load_checkpoint` from ``ray.tune.get_checkpoint()``; ``{}`` when the trial starts fresh."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as directory:
        return load_checkpoint(directory, model, wrapper, hparams=hparams, schedulers=schedulers)


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


__all__ = [
    "CHECKPOINT_FILE",
    "MetricsReporter",
    "apply_config_hparams",
    "group_labels",
    "hparam_metrics",
    "load_checkpoint",
    "report_metrics",
    "reporter_for",
    "restore_from_tune",
    "save_checkpoint",
    "wrap_optimizer",
]
