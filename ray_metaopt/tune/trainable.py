"""The provided Tune function trainable: a :class:`~ray_metaopt.training.TrainingRun` whose reports go to ``tune.report``."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from ..training.run import TrainingRun
from .reporting import tune_result


def _report_to_tune(result: dict, checkpoint_dir: str | None) -> None:
    from ray import tune

    checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir is not None else None
    tune.report(tune_result(result), checkpoint=checkpoint)


def metaopt_trainable(config: dict) -> None:
    """Ray Tune function trainable: train a task with a torch optimizer under a meta-optimizer.

    Use it as ``tune.run(metaopt_trainable, config=..., num_samples=...)`` or
    ``tune.Tuner(metaopt_trainable, param_space=...)``.

    Config keys (all but ``task`` optional; see
    :class:`~ray_metaopt.training.builders.TrialConfig`): ``task`` (``teacher_student``, ``moe``,
    ``digits``, ``sequence`` or a registered/own task), ``task_config``, ``optimizer``
    (``adamw``, ``adam``, ``sgd``, ``rmsprop``, ... from ``torch.optim``, or ``"module:Class"``
    such as ``"schedulefree:AdamWScheduleFree"``: an optimizer with ``train()``/``eval()`` is
    trained in train mode and evaluated and checkpointed in eval mode), ``optimizer_config``
    (``lr``, ``weight_decay``, ...; default ``{"lr": 1e-3}``), ``meta`` (``none``, ``plateau``
    (default), ``advanced_plateau``, ``expert_gate``, ``smart_expert_gate``, ``rl``),
    ``meta_config`` (constructor arguments over the trainable's defaults: ``update_frequency`` =
    ``eval_interval``, so decisions happen at evaluations, and ``monitor="val_loss"`` for the
    plateau strategies; for ``rl`` ``total_steps`` and ``seed`` are set from the trial unless
    given), ``max_steps`` (400), ``eval_interval`` (20), ``batch_size`` (64),
    ``seed`` (0), ``grad_clip`` (1.0), ``checkpoint_interval`` (1 evaluation), ``schedule``
    (``constant``/``cosine``/``linear``) with ``schedule_config``, ``metric_reduction``
    (``mean``: strategies see the mean training loss since their last decision), ``device``
    (``auto``). Keys starting with ``_`` are left to the user (e.g. for ``tune.with_resources``).
    An unknown name or key, or an invalid ``*_config``, fails the trial at its start with a
    message listing the valid choices.

    Reported at every evaluation (``tune.report``): ``step``, ``train_loss`` (mean since the
    last report), ``val_loss``, ``best_val_loss``, ``lr`` (group 0), ``lr/<group>`` and
    ``weight_decay/<group>`` per param group, ``meta/num_decisions``, ``meta/num_skipped``,
    ``meta/decisions`` (decision dicts since the last report), ``meta/strategy``, ``diverged``,
    ``lr_at_floor`` (every group's lr at the strategy's ``min_lr``), ``steps_per_second``,
    ``device``, and task extras as ``<task>/<name>`` (``moe/routing_entropy``,
    ``teacher_student/noise_floor``, ``digits/val_accuracy``...), and Tune's own ``done``: ``True``
    on the last report at ``max_steps``, so no scheduler acts on a finished trial. An RL strategy
    with ``stop_action=True`` may end the trial earlier: it is evaluated at that step, checkpointed
    and reported with ``done=True`` and ``stop_reason="policy_stop: ..."``. A trial whose loss, gradient
    norm or validation loss becomes non-finite reports ``diverged=True`` (with
    ``diverged_reason``) and ends without checkpointing that state; no optimizer step is ever
    taken on a non-finite loss or gradient.

    Checkpoints (model, optimizer with the strategy's state, lr schedule, the task's batch
    stream and the RNG) go with the report every ``checkpoint_interval`` evaluations and at the
    end; a trial resumes from ``tune.get_checkpoint()``, so ``Tuner.restore`` of an interrupted
    experiment completes it, and the resumed trial reproduces the uninterrupted one exactly.

    PBT: after an exploit the trial restores the donor's checkpoint under its own, perturbed
    config. The perturbed config wins for what PBT mutates in ``optimizer_config``: every
    group's ``lr``/``weight_decay`` is scaled so the reference group (the first group built with
    exactly the configured value: group 0 for the built-in tasks unless a task scales it, as
    ``moe``'s ``gate_lr_scale`` does) gets the configured value, keeping the ratios between
    groups and scaling the schedule
    anchors (so with ``schedule="cosine"`` the configured lr is the schedule's peak); other
    optimizer hyperparameters are set as configured. The strategy keeps its learning state
    (``meta_config`` changes apply, since the strategy is rebuilt from the config; the strategy
    type changing starts it fresh). The first result after such a restore lists the changes in
    ``config_overrides``. Run PBT with ``reuse_actors=True`` (``tune.run(...,
    reuse_actors=True)`` / ``TuneConfig(reuse_actors=True)``): exploits then restore in the
    running worker instead of starting a new one, many times faster for short trials.

    Example:
        >>> space = {"task": "digits", "meta": tune.grid_search(["none", "plateau"]),
        ...          "optimizer_config": {"lr": tune.loguniform(1e-4, 1e-2)}}
        >>> tune.run(metaopt_trainable, config=space, num_samples=4, metric="val_loss", mode="min")
    """
    run = TrainingRun(config)
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            run.restore(directory)
    run.train(_report_to_tune)


def trainable_with_resources(resources: Any) -> Callable[[dict], None]:
    """:func:`metaopt_trainable` with Tune resources per trial, as its own function object.

    ``tune.with_resources(fn, ...)`` stores the resources *on* ``fn``, so calling it on the
    shared :func:`metaopt_trainable` changes every later run in the process (and a later
    ``tune.run(metaopt_trainable, resources_per_trial=...)`` then fails). This wraps a fresh
    function instead.

    Args:
        resources: what ``tune.with_resources`` takes: ``{"cpu": 1, "gpu": 0.5}``, a
            ``PlacementGroupFactory``, or a callable of the config.

    Example:
        >>> tune.Tuner(trainable_with_resources({"cpu": 1, "gpu": 0.25}), param_space=space).fit()
    """
    from ray import tune

    def metaopt_trainable_(config: dict) -> None:
        metaopt_trainable(config)

    metaopt_trainable_.__doc__ = metaopt_trainable.__doc__
    return tune.with_resources(metaopt_trainable_, resources)


def rebuild_from_result(result: Any, *, checkpoint: Any = None) -> TrainingRun:
    """The :class:`TrainingRun` of a finished trial, at its checkpoint: model, wrapped optimizer
    (with the meta-optimizer's state), lr schedule and task, ready to evaluate or train on.

    Args:
        result: a ``ray.tune.Result`` (``grid.get_best_result()``, ``grid[i]``) of
            :func:`metaopt_trainable` (its ``config`` and ``checkpoint`` are used).
        checkpoint: another ``tune.Checkpoint`` of that trial (default: ``result.checkpoint``,
            the latest).

    Example:
        >>> run = rebuild_from_result(grid.get_best_result())
        >>> run.model, run.wrapper, run.step          # the wrapper holds the strategy's state
        >>> run.config = dataclasses.replace(run.config, max_steps=2000); run.train(lambda r, d: None)
    """
    checkpoint = checkpoint if checkpoint is not None else getattr(result, "checkpoint", None)
    config = getattr(result, "config", None)
    if not isinstance(config, Mapping):
        raise TypeError(f"result must be a ray.tune.Result with a config dict, got result={result!r}")
    if checkpoint is None:
        raise ValueError(
            f"result has no checkpoint (trial {getattr(result, 'path', '?')}); the trainable checkpoints at "
            "every checkpoint_interval evaluations and at the end, unless the trial diverged first"
        )
    run = TrainingRun(config)
    with checkpoint.as_directory() as directory:
        run.restore(directory)
    return run


__all__ = ["TrainingRun", "metaopt_trainable", "rebuild_from_result", "trainable_with_resources"]
