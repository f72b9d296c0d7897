"""One training run of a task under a wrapped optimizer, without Ray: what every Tune trial runs.

:class:`TrainingRun` trains, evaluates, checkpoints and restores; :mod:`ray_metaopt.tune.trainable`
only hands its reports to ``tune.report``. Tests, notebooks and the paired reference use it as is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
import time
from typing import Any, Callable, Iterator, Mapping

import torch

from ..rl.rewards import REFERENCE_LOSS, REFERENCE_VAL_LOSS
from ..wrapper import OptimizerWrapper
from .builders import (
    TrialConfig,
    build_meta_optimizer,
    build_optimizer,
    build_schedule,
    check_val_loss_alignment,
    optimizer_class,
    optimizer_defaults,
    resolve_config,
    trial_meta_defaults,
)
from .checkpoint import load_checkpoint, save_checkpoint
from .reporter import STOP_REASON_KEY, MetricsReporter
from .tasks import make_task

ReportFn = Callable[[dict, "str | None"], None]

# Result key, with ``paired_reference``: the reference's mean training loss over the steps the
# report's ``train_loss`` averages (its ``val_loss`` goes under REFERENCE_VAL_LOSS).
REFERENCE_TRAIN_LOSS = "reference_train_loss"


class TrainingRun:
    """One trial's training: builds task, model, optimizer and strategy from a config, then trains.

    :func:`metaopt_trainable` is this class plus Tune's report and checkpoint calls; the class
    runs without Ray too (``report`` is any callable), which is how the tests check the loop.

    Each step: draw a batch, ``backward``, clip (``grad_clip``), check the loss and gradient
    norm are finite, ``optimizer.step()``, the lr schedule's step, and at evaluation steps the
    validation pass; then ``update_hyperparameters`` with ``loss`` and ``grad_norm`` (device
    tensors), ``step_time`` (seconds), ``val_loss`` at evaluations and the task's per-step
    metrics (e.g. ``routing_entropy``). A decision therefore applies from the next step on.

    A non-finite loss or gradient norm stops the trial *before* the optimizer step (on the CPU;
    on an accelerator the flag is read every ``min(eval_interval, 16)`` steps, so that the other
    steps need no host sync, and the trial stops at the next read), and a
    non-finite validation loss at an evaluation stops it before the strategy sees it: the trial
    reports ``diverged=True`` with ``diverged_reason``, writes no checkpoint of that state, and
    returns, so training never continues on non-finite values (the last checkpoint stays the last
    good state). The per-step check reads one value on the host (one sync per step on CUDA).

    Args:
        config: the trial config (see :class:`~ray_metaopt.training.builders.TrialConfig`).

    Example:
        >>> run = TrainingRun({"task": "teacher_student", "max_steps": 40, "eval_interval": 20})
        >>> results = []
        >>> run.train(lambda metrics, checkpoint_dir: results.append(metrics))
        >>> [r["step"] for r in results]
        [20, 40]
    """

    def __init__(self, config: Mapping[str, Any] | TrialConfig) -> None:
        self.config = config if isinstance(config, TrialConfig) else resolve_config(config)
        c = self.config
        # Before this run seeds anything: the reference seeds the same streams itself.
        self.reference = paired_reference(c) if c.paired_reference else None
        self.loss_trace: list[torch.Tensor] | None = None  # per-step training losses, when a list
        self.task_name, self.task = make_task(c.task, c.task_config, seed=c.seed, device=c.device)
        self.device = self.task.device
        torch.manual_seed(c.seed)  # the global stream (dropout) of this trial
        self.model = self.task.build_model()
        cls = optimizer_class(c.optimizer)
        lr, weight_decay = optimizer_defaults(cls, c.optimizer_config)
        groups = self.task.param_groups(self.model, lr=lr, weight_decay=weight_decay)
        optimizer = build_optimizer(cls, groups, c.optimizer_config)
        self.stop_reason: str | None = None  # set by a strategy's stop action (on_stop)
        meta = build_meta_optimizer(
            c.meta,
            c.meta_config,
            total_steps=c.max_steps,
            seed=c.seed,
            # on_stop: only strategies that take it (the RL stop action) get it.
            defaults={**trial_meta_defaults(c.meta, c.eval_interval), "on_stop": self._request_stop},
        )
        check_val_loss_alignment(meta, c.eval_interval)
        self.wrapper = OptimizerWrapper(optimizer, meta, metric_reduction=c.metric_reduction)
        scheduler = build_schedule(self.wrapper, c.schedule, c.max_steps, **c.schedule_config)
        self.schedulers = [self.wrapper.attach_scheduler(scheduler)] if scheduler is not None else []
        self.reporter = MetricsReporter(self.wrapper, prefix=self.task_name)
        self.reporter.constants = self.task.info()
        self.step = 0
        self.config_overrides: list[dict] = []
        self._optimizer_training = False

    def _request_stop(self, reason: str) -> None:
        """The strategy's stop action: the run ends at this step, reporting ``reason``."""
        self.stop_reason = str(reason)

    # ------------------------------------------------------------------ checkpoints
    @property
    def configured_hparams(self) -> dict[str, Any]:
        """The optimizer hyperparameters the config sets (what PBT may perturb)."""
        return dict(self.config.optimizer_config)

    def save(self, directory: str) -> str:
        """Write the trial's full state (model, optimizer + strategy, schedule, task stream, RNG).

        A schedule-free optimizer is saved in its eval mode (the weights it evaluates at), as its
        authors advise; :meth:`train` switches it back to train mode.
        """
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        with self._optimizer_eval_mode():
            return save_checkpoint(
                directory,
                self.model,
                self.wrapper,
                hparams=self.configured_hparams,
                schedulers=self.schedulers,
                reporter=self.reporter,  # its state is already that of the report this goes with
                step=self.step,
                task=self.task.state_dict(),
                rng=rng,
            )

    # ------------------------------------------------------------------ optimizer modes
    def _optimizer_mode(self, mode: str) -> None:
        # Schedule-free optimizers (the `schedulefree` package) train at one point and evaluate
        # at another; they switch with optimizer.train() / optimizer.eval(). Others have neither.
        switch = getattr(self.wrapper.optimizer, mode, None)
        if callable(switch):
            switch()
        self._optimizer_training = mode == "train"

    @contextlib.contextmanager
    def _optimizer_eval_mode(self) -> Iterator[None]:
        was_training = self._optimizer_training
        self._optimizer_mode("eval")
        try:
            yield
        finally:
            if was_training:
                self._optimizer_mode("train")

    def restore(self, directory: str) -> None:
        """Continue from a checkpoint written by :meth:`save` (configured hparams that changed win)."""
        extra = load_checkpoint(
            directory, self.model, self.wrapper, hparams=self.configured_hparams, schedulers=self.schedulers,
            reporter=self.reporter,
        )
        self.step = int(extra["step"])
        self.task.load_state_dict(extra["task"])
        torch.set_rng_state(extra["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in extra["rng"]:
            torch.cuda.set_rng_state(extra["rng"]["cuda"], self.device)
        self.config_overrides = extra["config_overrides"]
        # A run its strategy had stopped stays stopped (e.g. a PBT exploit of a stopped donor).
        self.stop_reason = getattr(self.wrapper.meta_optimizer, "stop_requested", None)

    # ------------------------------------------------------------------ training
    def _evaluate(self) -> dict[str, float]:
        self.model.eval()
        try:
            with torch.no_grad(), self._optimizer_eval_mode():
                return self.task.evaluate(self.model)
        finally:
            self.model.train()

    def _result(
        self, train_loss: float, evaluation: Mapping[str, float], diverged: bool, interval_steps: int = 0
    ) -> dict[str, Any]:
        """One report. ``interval_steps``: the steps ``train_loss`` is the mean of (0: one batch
        outside training), for the paired reference's mean over the same steps."""
        extras = {k: v for k, v in evaluation.items() if k != "val_loss"}
        result = self.reporter.metrics(
            step=self.step,
            train_loss=train_loss,
            val_loss=evaluation.get("val_loss", math.nan),
            extras=extras,
            diverged=diverged,
        )
        result["device"] = self.device.type
        # A stable schema from the first result on (Tune's CSV logger fixes its header there):
        # keys that are set only sometimes are always present, empty until set.
        result["config_overrides"] = self.config_overrides
        self.config_overrides = []
        result["diverged_reason"] = ""
        finished = self.step >= self.config.max_steps
        result[STOP_REASON_KEY] = "max_steps" if finished else ""
        if self.stop_reason is not None and not diverged:
            finished = True
            result[STOP_REASON_KEY] = self.stop_reason
        # The last report ends the trial in Tune itself (Tune's own `done` key): no scheduler acts
        # on it. Otherwise PBT could exploit a finished trial at its last report, which restores
        # it at the end, reports again, is exploited again... (two tied trials never stop).
        result["done"] = finished and not diverged
        if self.reference is not None:
            # The base schedule at this seed over the same steps, so a reader can pair this
            # trial's curves with it (the RL learning curve does): NaN where it has no value.
            steps = self.reference["loss"][self.step - interval_steps : self.step] if interval_steps else []
            result[REFERENCE_TRAIN_LOSS] = sum(steps) / len(steps) if len(steps) == interval_steps else math.nan
            result[REFERENCE_VAL_LOSS] = self.reference["val_loss"].get(self.step, math.nan)
        return result

    def _diverged(self, result: dict[str, Any], reason: str) -> dict[str, Any]:
        result["diverged_reason"] = reason
        result[STOP_REASON_KEY] = f"diverged: {reason}"
        return result

    def train(self, report: ReportFn) -> dict[str, Any] | None:
        """Train from :attr:`step` to ``max_steps``; call ``report(result, checkpoint_dir)`` at evaluations.

        ``checkpoint_dir`` is a directory holding the state when a checkpoint is due (valid
        only during the call), else ``None``. Returns the last result. A schedule-free optimizer
        is in train mode during training and back in eval mode when this returns (or raises),
        so :attr:`model` then holds the weights it was evaluated at.
        """
        self.model.train()
        self._optimizer_mode("train")
        try:
            return self._train(report)
        finally:
            self._optimizer_mode("eval")

    def _train(self, report: ReportFn) -> dict[str, Any] | None:
        c = self.config
        clip = math.inf if c.grad_clip is None else float(c.grad_clip)
        params = [p for group in self.wrapper.param_groups for p in group["params"]]
        loss_sum = torch.zeros((), device=self.device)
        loss_count = 0
        evaluations = self.step // c.eval_interval
        # Reading the finiteness flag is a host sync: every step on the CPU (free), every
        # `check_every` steps and at evaluations on an accelerator, so steps in between run async.
        check_every = 1 if self.device.type == "cpu" else min(c.eval_interval, 16)
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        last: dict[str, Any] | None = None
        self.reporter.restart_timer(self.step)
        if self.step >= c.max_steps or self.stop_reason is not None:
            # Restored at the end, or after the strategy's stop action (a PBT exploit whose donor
            # has finished clones its final checkpoint): report this trial's own final state once (done=True, so no further
            # exploit), or its last result would be the one from before the exploit.
            self.model.eval()
            with torch.no_grad(), self._optimizer_eval_mode():  # one batch, no step: its loss
                train_loss = float(self.task.training_step(self.model, c.batch_size).loss)
            self.model.train()
            evaluation = self._evaluate()
            diverged = not (math.isfinite(evaluation["val_loss"]) and math.isfinite(train_loss))
            last = self._result(train_loss, evaluation, diverged=diverged)
            with tempfile.TemporaryDirectory(prefix="metaopt_ckpt_") as directory:
                self.save(directory)
                report(last, directory)
            return last
        while self.step < c.max_steps:
            started = time.perf_counter()
            out = self.task.training_step(self.model, c.batch_size)
            self.wrapper.zero_grad(set_to_none=True)
            out.loss.backward()
            loss = out.loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            nonfinite |= ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
            next_step = self.step + 1
            due = next_step % check_every == 0 or next_step % c.eval_interval == 0 or next_step == c.max_steps
            if due and bool(nonfinite):
                what = "loss" if not math.isfinite(float(loss)) else "gradient norm"
                last = self._result(float(loss), {}, diverged=True)
                if check_every == 1:
                    self._diverged(last, f"non-finite {what} at step {self.step}; no optimizer step was taken")
                else:
                    self._diverged(
                        last,
                        f"non-finite loss or gradient norm within steps {self.step - check_every + 1}-{self.step} "
                        f"(checked every {check_every} steps on {self.device.type}); stopped before step {self.step}",
                    )
                report(last, None)
                return last
            self.wrapper.step()
            for scheduler in self.schedulers:
                scheduler.step()
            self.step += 1
            loss_sum += loss
            loss_count += 1
            metrics: dict[str, Any] = {
                "loss": loss,
                "grad_norm": grad_norm,
                "step_time": time.perf_counter() - started,
                **out.metrics,
            }
            if self.loss_trace is not None:
                self.loss_trace.append(loss)  # read once at the end: no host sync per step
            if self.reference is not None and self.step <= len(self.reference["loss"]):
                metrics[REFERENCE_LOSS] = self.reference["loss"][self.step - 1]
            is_eval = self.step % c.eval_interval == 0 or self.step == c.max_steps
            if not is_eval:
                self.wrapper.update_hyperparameters(metrics, step=self.step - 1)
                if self.stop_reason is None:
                    continue
                is_eval = True  # stopped between evaluations: evaluate once more, then end
                metrics = {}
            evaluation = self._evaluate()
            train_loss = float(loss_sum / loss_count)
            interval_steps, loss_count = loss_count, 0
            loss_sum.zero_()
            if not math.isfinite(evaluation["val_loss"]):
                last = self._result(train_loss, evaluation, diverged=True, interval_steps=interval_steps)
                self._diverged(last, f"non-finite val_loss after step {self.step}")
                report(last, None)
                return last
            if metrics:  # not after a stop between evaluations (the strategy has decided)
                metrics["val_loss"] = evaluation["val_loss"]
                if self.reference is not None and self.step in self.reference["val_loss"]:
                    metrics[REFERENCE_VAL_LOSS] = self.reference["val_loss"][self.step]
                self.wrapper.update_hyperparameters(metrics, step=self.step - 1)
            evaluations += 1
            last = self._result(train_loss, evaluation, diverged=False, interval_steps=interval_steps)
            ending = self.step >= c.max_steps or self.stop_reason is not None
            if ending:
                self._finish_meta()  # before the last report: Tune stops the trial when it takes it
            checkpoint_due = ending or (
                c.checkpoint_interval and evaluations % c.checkpoint_interval == 0
            )
            if checkpoint_due:
                with tempfile.TemporaryDirectory(prefix="metaopt_ckpt_") as directory:
                    self.save(directory)
                    report(last, directory)
            else:
                report(last, None)
            if self.stop_reason is not None:
                break
        return last

    def _finish_meta(self) -> None:
        finish = getattr(self.wrapper.meta_optimizer, "finish", None)
        if callable(finish):  # RL: end the episode and let the last rollouts reach a shared policy
            finish()


def paired_reference(config: TrialConfig) -> dict[str, Any]:
    """Train ``config`` with ``meta="none"`` (same seed, batches, optimizer, schedule) and return
    its training loss at every step (``"loss"``, index = step) and its ``val_loss`` by
    evaluation step (``"val_loss"``): what ``paired_reference=True`` gives the strategy.
    A reference that diverges ends its curves there (later steps get no reference).

    The reference follows the trial's own ``schedule``; an RL ``base_schedule`` in
    ``meta_config`` would be a different base, so it is refused."""
    base = config.meta_config.get("base_schedule")
    if base is not None:
        raise ValueError(
            "paired_reference=True pairs the trial with its own `schedule`, so the strategy must anchor "
            f"on it: got meta_config base_schedule={base!r}; use schedule={base!r} with base_schedule=None"
            if isinstance(base, str)
            else f"paired_reference=True pairs the trial with its own `schedule`; got meta_config "
            f"base_schedule={base!r}, use base_schedule=None"
        )
    run = TrainingRun(
        dataclasses.replace(config, meta="none", meta_config={}, paired_reference=False, checkpoint_interval=0)
    )
    run.loss_trace = []
    val_loss: dict[int, float] = {}

    def keep(result: dict, checkpoint_dir: str | None) -> None:
        if not result.get("diverged") and math.isfinite(result["val_loss"]):
            val_loss[int(result["step"])] = float(result["val_loss"])

    run.train(keep)
    losses = torch.stack(run.loss_trace).tolist() if run.loss_trace else []
    bad = next((i for i, x in enumerate(losses) if not math.isfinite(x)), None)
    return {"loss": losses if bad is None else losses[:bad], "val_loss": val_loss}


__all__ = ["REFERENCE_TRAIN_LOSS", "ReportFn", "TrainingRun", "paired_reference"]
