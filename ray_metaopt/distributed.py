"""Identical hyperparameter decisions on every rank of a data-parallel (DDP) job.

With ``DistributedDataParallel`` every rank holds its own optimizer. If each rank ran its own
meta-optimizer on its own shard's loss, the ranks would drift apart: different learning rates,
different decision steps, and a stochastic strategy (the RL policy) would sample different
actions. :class:`DistributedOptimizerWrapper` keeps them identical:

1. At a decision step every rank gathers every rank's metrics (one ``all_gather_object``) and
   takes their mean, so the decision sees the whole batch, not one shard.
2. One rank (``decision_rank``, rank 0 by default) decides and applies the decision.
3. It broadcasts (one ``broadcast_object_list``) the resulting hyperparameter values of every
   param group, its new decision-log records and its decision schedule; the other ranks write
   those values and records, so every rank's ``param_groups``, ``log`` and next decision step
   are the same.

Steps that are not decision steps communicate nothing. Without an initialised process group
(or with a single process) the wrapper behaves exactly like :class:`~ray_metaopt.OptimizerWrapper`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.distributed as dist

from ._validation import check_int
from .history import Decision, SkippedDecision
from .metrics import to_float
from .wrapper import OptimizerWrapper

# Hyperparameters whose per-group values are broadcast at every decision step (others are
# broadcast when a decision touched them).
_SYNCED_HPARAMS = ("lr", "weight_decay")


def _mean_metrics(gathered: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Mean of each metric over the ranks that reported it, summed in rank order."""
    keys: list[str] = []
    for _, values in gathered:
        keys.extend(k for k in values if k not in keys)
    means = {}
    for key in keys:
        column = [values[key] for _, values in gathered if key in values]
        if all(math.isfinite(v) for v in column):
            means[key] = math.fsum(column) / len(column)
        else:  # fsum raises on inf - inf; any non-finite rank makes the mean non-finite
            means[key] = math.nan
    return means


class DistributedOptimizerWrapper(OptimizerWrapper):
    """An :class:`~ray_metaopt.OptimizerWrapper` that makes every DDP rank apply the same decisions.

    Create it on every rank, after ``torch.distributed.init_process_group`` (Ray Train's
    ``TorchTrainer`` does that before your training function runs), with the same strategy and
    arguments on every rank, and call :meth:`update_hyperparameters` on every rank at every step
    with the same ``step``. Only ``decision_rank``'s meta-optimizer decides (and, for the RL
    strategy, talks to the shared policy actor); the others mirror its hyperparameters, decision
    log and schedule. Save checkpoints from ``decision_rank`` (``is_decision_rank``), as is usual
    with DDP, or pass ``sync_state=True`` so every rank's meta-optimizer state is a copy of it.

    Args:
        optimizer: the rank's optimizer (e.g. over ``ddp_model.parameters()``).
        meta_optimizer: the strategy; construct it identically on every rank.
        process_group: the ``torch.distributed`` process group to agree within (default: the
            whole world).
        decision_rank: rank *within* ``process_group`` that decides.
        sync_state: also broadcast the deciding meta-optimizer's ``state_dict()`` at each decision
            step so every rank holds its full learning state (costs a larger broadcast).
        metric_reduction: ``"last"`` or ``"mean"`` over the steps since the last decision, on
            each rank, before the mean across ranks.
        max_log_records: how many decisions to keep in :attr:`log` (``None``: all).

    Example:
        >>> # inside a Ray Train worker (TorchTrainer) or a torchrun process
        >>> model = ray.train.torch.prepare_model(net)
        >>> opt = DistributedOptimizerWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3),
        ...                                   PlateauMetaOptimizer(patience=3, lr_factor=0.5))
        >>> opt.zero_grad(); loss.backward()
        >>> opt.update_hyperparameters({"loss": loss.detach()}); opt.step()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        meta_optimizer: Any,
        *,
        process_group: Any = None,
        decision_rank: int = 0,
        sync_state: bool = False,
        metric_reduction: str = "last",
        max_log_records: int | None = 10_000,
    ) -> None:
        self.decision_rank = check_int("decision_rank", decision_rank, minimum=0)
        if not isinstance(sync_state, bool):
            raise TypeError(f"sync_state must be a bool, got sync_state={sync_state!r}")
        self.sync_state = sync_state
        self.process_group = process_group
        super().__init__(
            optimizer, meta_optimizer, metric_reduction=metric_reduction, max_log_records=max_log_records
        )
        if self.is_distributed:
            size = dist.get_world_size(process_group)
            if self.decision_rank >= size:
                raise ValueError(
                    f"decision_rank must be < the process group's size {size}, got decision_rank={decision_rank}"
                )
            if dist.get_rank(process_group) < 0:
                raise ValueError("this process is not a member of process_group")

    # ------------------------------------------------------------ process group
    @property
    def is_distributed(self) -> bool:
        """Whether decisions are synchronised (an initialised process group with > 1 process)."""
        return (
            dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    @property
    def rank(self) -> int:
        """This process's rank in ``process_group`` (0 without torch.distributed)."""
        return dist.get_rank(self.process_group) if self.is_distributed else 0

    @property
    def is_decision_rank(self) -> bool:
        """Whether this rank decides (always true without torch.distributed)."""
        return not self.is_distributed or self.rank == self.decision_rank

    def _src(self) -> int:
        # broadcast_object_list takes a global rank; decision_rank is a rank in the group.
        if self.process_group is None:
            return self.decision_rank
        return dist.get_global_rank(self.process_group, self.decision_rank)

    # ------------------------------------------------------------ deciding and applying
    def update_hyperparameters(self, metrics: Mapping[str, Any], step: int | None = None) -> list[Decision]:
        """Report this rank's metrics; at decision steps, decide once and apply it on every rank.

        Args:
            metrics: name -> Python number or one-element tensor, this rank's values. At a
                decision step the strategy sees the mean over ranks of each metric.
            step: the training step (the same on every rank); by default an internal counter.

        Returns:
            The decisions applied now, identical on every rank (empty on most steps).

        Raises:
            RuntimeError: at a decision step, when the ranks report different ``step`` values
                (raised on every rank, so none is left waiting).
        """
        if not self.is_distributed:
            return super().update_hyperparameters(metrics, step)
        # Every rank holds the decision rank's schedule, so they all reach a decision together.
        step, local = self._collect(metrics, step)
        if local is None:
            return []

        gathered: list[Any] = [None] * dist.get_world_size(self.process_group)
        dist.all_gather_object(gathered, (step, local), group=self.process_group)
        steps = sorted({s for s, _ in gathered})
        if len(steps) > 1:
            raise RuntimeError(
                f"ranks reached a decision step at different steps {steps}; call update_hyperparameters "
                "on every rank with the same step"
            )

        payload: list[Any] = [None]
        if self.rank == self.decision_rank:
            payload[0] = self._decide_and_pack(_mean_metrics(gathered), step)
        dist.broadcast_object_list(payload, src=self._src(), group=self.process_group)
        if self.rank == self.decision_rank:
            return [Decision(**d) for d in payload[0]["decisions"]]
        return self._unpack_and_apply(payload[0])

    def _decide_and_pack(self, values: dict[str, float], step: int) -> dict[str, Any]:
        """Decide on ``values`` exactly as the plain wrapper does and describe the outcome."""
        skipped_before = self.log.num_skipped
        bad = next((k for k, v in values.items() if not math.isfinite(v)), None)
        if bad is not None:
            self.log.add_skipped(SkippedDecision(step, f"non-finite metric {bad}={values[bad]} (mean over ranks)"))
            self._retry = True
            applied: list[Decision] = []
        else:
            applied = self._decide_and_apply(values, step)
        new_skipped = self.log.num_skipped - skipped_before
        skipped = self.log.skipped[-new_skipped:] if new_skipped else []
        touched = {d.hparam for d in applied}
        meta = self.meta_optimizer
        packed: dict[str, Any] = {
            "decisions": [d.to_dict() for d in applied],
            "skipped": [s.to_dict() for s in skipped],
            "hparams": [
                {k: to_float(g[k]) for k in (*_SYNCED_HPARAMS, *sorted(touched)) if k in g}
                for g in self.param_groups
            ],
            "schedule": {
                "interval": meta.interval,
                "next_update_step": meta.next_update_step,
                "last_update_step": meta.last_update_step,
                "last_monitored": meta._last_monitored,
                "retry": self._retry,
            },
        }
        if self.sync_state:
            packed["meta_state"] = meta.state_dict()
        return packed

    def _unpack_and_apply(self, packed: Mapping[str, Any]) -> list[Decision]:
        """Write the deciding rank's hyperparameters, log records and schedule here."""
        if len(packed["hparams"]) != len(self.param_groups):
            raise RuntimeError(
                f"the deciding rank has {len(packed['hparams'])} param groups but this rank has "
                f"{len(self.param_groups)}; every rank must build the same optimizer"
            )
        for index, (group, hparams) in enumerate(zip(self.param_groups, packed["hparams"])):
            for key, new in hparams.items():
                if key not in group:
                    continue
                old = to_float(group[key])
                if new == old:
                    continue
                if isinstance(group[key], torch.Tensor):
                    group[key].fill_(new)
                else:
                    group[key] = new
                if key == "lr" and old > 0:
                    self._rescale_schedule(index, new / old)
        decisions = [Decision(**d) for d in packed["decisions"]]
        for decision in decisions:
            self.log.add(decision)
        for skipped in packed["skipped"]:
            self.log.add_skipped(SkippedDecision(**skipped))
        meta = self.meta_optimizer
        if "meta_state" in packed:
            meta.load_state_dict(packed["meta_state"])
        schedule = packed["schedule"]
        meta.interval = schedule["interval"]
        meta.next_update_step = schedule["next_update_step"]
        meta.last_update_step = schedule["last_update_step"]
        meta._last_monitored = schedule["last_monitored"]
        self._retry = schedule.get("retry", False)
        return decisions

    def __repr__(self) -> str:
        return (
            f"DistributedOptimizerWrapper({self.optimizer!r}, {self.meta_optimizer!r}, "
            f"decision_rank={self.decision_rank})"
        )
