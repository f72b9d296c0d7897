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

:func:`wrap_optimizer`, :func:`save_checkpoint` and :func:`load_checkpoint` come from the Ray-free
:mod:`ray_metaopt.training` (see :mod:`ray_metaopt.training.checkpoint` for which value wins
after a PBT restore); this module adds the two calls that talk to Tune.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import torch

from ..metrics import to_float
from ..training.builders import wrap_optimizer
from ..training.checkpoint import REPORTER_FILE, load_checkpoint, save_checkpoint
from ..training.reporter import MetricsReporter, reporter_for
from ..wrapper import OptimizerWrapper


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


__all__ = [
    "load_checkpoint",
    "report_metrics",
    "restore_from_tune",
    "save_checkpoint",
    "tune_result",
    "wrap_optimizer",
]
