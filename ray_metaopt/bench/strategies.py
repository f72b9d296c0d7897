"""Baselines and RL controls of the benchmark, written as strategies the provided trainable runs.

Each is a :class:`~ray_metaopt.MetaOptimizer`, so a trial uses it with
``config["meta"] = "ray_metaopt.bench.strategies:<Class>"`` and it goes through the same wrapper
(bounds, non-finite guard, decision log, checkpoints) as every other arm:

- :class:`TorchReduceLROnPlateau`: torch's own ``ReduceLROnPlateau`` deciding, the wrapper
  applying; stepped once per evaluation on ``val_loss``, as it is used per epoch.
- :class:`LRReplay`: replays a fixed lr-factor trajectory (the RL policy's average one).
- :class:`StateBlindRLMetaOptimizer`: the RL meta-optimizer with its state zeroed, so its
  actions cannot depend on the training dynamics (same network, same weights).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping, Sequence

import torch

from .._validation import check_choice, check_int, check_range
from ..base import GroupState, HParamUpdate, MetaOptimizer
from ..rl import RLMetaOptimizer


class TorchReduceLROnPlateau(MetaOptimizer):
    """``torch.optim.lr_scheduler.ReduceLROnPlateau`` as a strategy: torch decides, the wrapper applies.

    At each decision the current lrs are copied into a private one-parameter-per-group shadow
    optimizer, torch's scheduler steps on ``monitor`` and the lrs it sets become the proposals.
    Its counters (best value, bad epochs, cooldown) are the strategy's state, so checkpoints
    and PBT restores carry them. With the provided trainable the decision is made at every
    evaluation (``update_frequency = eval_interval``), so ``patience`` counts evaluations, as it
    counts epochs in torch.

    Args:
        update_frequency: steps between decisions (a multiple of the evaluation interval when
            ``monitor="val_loss"``).
        monitor: metric to watch (``"val_loss"``).
        mode, factor, patience, threshold, threshold_mode, cooldown, eps: torch's arguments,
            with torch's defaults.
        min_lr, max_lr: the wrapper's bounds (see :class:`~ray_metaopt.MetaOptimizer`).

    Example:
        >>> meta = TorchReduceLROnPlateau(update_frequency=50, patience=2)
        >>> opt = OptimizerWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3), meta)
    """

    _state_attrs: ClassVar[tuple[str, ...]] = ("torch_state",)

    def __init__(
        self,
        update_frequency: int = 1,
        *,
        monitor: str = "val_loss",
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        eps: float = 1e-8,
        min_lr: Any = 0.0,
        max_lr: Any = None,
    ) -> None:
        super().__init__(update_frequency, min_lr=min_lr, max_lr=max_lr)
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"monitor must be a metric name, got monitor={monitor!r}")
        self.monitor = monitor
        self.mode = check_choice("mode", mode, ("min", "max"))
        self.factor = check_range("factor", factor, 0.0, 1.0, low_open=True, high_open=True)
        self.patience = check_int("patience", patience, minimum=0)
        self.threshold = check_range("threshold", threshold, 0.0)
        self.threshold_mode = check_choice("threshold_mode", threshold_mode, ("rel", "abs"))
        self.cooldown = check_int("cooldown", cooldown, minimum=0)
        self.eps = check_range("eps", eps, 0.0)
        self.reset()

    def _init_state(self) -> None:
        self.torch_state: dict[str, Any] | None = None

    def _scheduler(self, lrs: Sequence[float]) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
        shadow = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in lrs])
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            shadow,
            mode=self.mode,
            factor=self.factor,
            patience=self.patience,
            threshold=self.threshold,
            threshold_mode=self.threshold_mode,
            cooldown=self.cooldown,
            eps=self.eps,
        )
        if self.torch_state is not None:
            state = dict(self.torch_state)
            state["min_lrs"] = [0.0] * len(lrs)  # groups may have been added; bounds are the wrapper's
            state["_last_lr"] = list(lrs)
            scheduler.load_state_dict(state)
        return scheduler

    def decide(self, metrics: Mapping[str, float], step: int, groups: Sequence[GroupState]) -> list[HParamUpdate]:
        if self.monitor not in metrics or not groups:
            return []
        lrs = [g.lr for g in groups]
        scheduler = self._scheduler(lrs)
        scheduler.step(float(metrics[self.monitor]))
        state = scheduler.state_dict()
        self.torch_state = {k: (list(v) if isinstance(v, list) else v) for k, v in state.items()}
        updates = []
        for g, group in zip(groups, scheduler.optimizer.param_groups):
            new = float(group["lr"])
            if new != g.lr:
                updates.append(
                    HParamUpdate(g.index, "lr", new, f"torch ReduceLROnPlateau: {self.monitor} plateaued, lr x{self.factor:g}")
                )
        return updates

    def __repr__(self) -> str:
        return f"TorchReduceLROnPlateau(update_frequency={self.update_frequency}, patience={self.patience}, factor={self.factor})"


class LRReplay(MetaOptimizer):
    """Replays an lr-multiplier trajectory on top of whatever schedule the optimizer follows.

    ``schedule`` is ``[[from_step, factor], ...]``: from ``from_step`` completed optimizer steps on,
    every group's lr is ``factor`` times its base (1 before the first entry). The base is what the
    lr would be without the replay: on a constant lr the initial lr, with a torch LR scheduler
    attached to the wrapper that scheduler's value (the wrapper keeps the scheduler's
    ``base_lrs`` scaled by each change). Decisions happen every ``update_frequency`` steps; at a
    decision after ``n`` completed steps the factor of the last entry with ``from_step <= n``
    applies. With the ``update_frequency`` of the run the schedule was recorded from, the replay
    changes the lr at exactly the same steps.

    Args:
        schedule: ``[[from_step, factor], ...]`` sorted by step, factors positive and finite.
        update_frequency: steps between decisions.

    Example:
        >>> meta = LRReplay([[10, 0.5], [20, 0.25]], update_frequency=10)
    """

    _state_attrs: ClassVar[tuple[str, ...]] = ("applied",)

    def __init__(self, schedule: Sequence[Sequence[float]], update_frequency: int = 1, **bounds: Any) -> None:
        super().__init__(update_frequency, **bounds)
        if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence):
            raise TypeError(f"schedule must be a list of [from_step, factor] pairs, got schedule={schedule!r}")
        entries: list[tuple[int, float]] = []
        for i, entry in enumerate(schedule):
            if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 2:
                raise TypeError(f"schedule[{i}] must be a [from_step, factor] pair, got schedule[{i}]={entry!r}")
            start = check_int(f"schedule[{i}][0]", entry[0], minimum=0)
            factor = check_range(f"schedule[{i}][1]", entry[1], 0.0, math.inf, low_open=True, high_open=True)
            if entries and start <= entries[-1][0]:
                raise ValueError(f"schedule steps must increase, got schedule[{i}][0]={start} after {entries[-1][0]}")
            entries.append((start, factor))
        self.schedule = entries
        self.reset()

    def factor_at(self, completed_steps: int) -> float:
        """The lr factor in force after ``completed_steps`` optimizer steps."""
        factor = 1.0
        for start, f in self.schedule:
            if start > completed_steps:
                break
            factor = f
        return factor

    def _init_state(self) -> None:
        self.applied: list[float] = []  # per group: the factor in force (plain data, checkpointed)

    def decide(self, metrics: Mapping[str, float], step: int, groups: Sequence[GroupState]) -> list[HParamUpdate]:
        factor = self.factor_at(step + 1)
        updates = []
        for g in groups:
            while len(self.applied) <= g.index:
                self.applied.append(1.0)
            current = self.applied[g.index]
            if factor != current:
                new = g.lr * factor / current  # g.lr / current: the base's value now
                updates.append(HParamUpdate(g.index, "lr", new, f"replay: lr = {factor:.4g} x base"))
                self.applied[g.index] = factor
        return updates

    def __repr__(self) -> str:
        return f"LRReplay(update_frequency={self.update_frequency}, {len(self.schedule)} changes)"


class _ZeroedFeatures:
    """A feature extractor whose state rows are all zeros; everything else is the real one's."""

    def __init__(self, features: Any) -> None:
        self._inner = features

    def __getattr__(self, name: str) -> Any:
        if name == "_inner":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)

    def global_features(self, *args: Any, **kwargs: Any) -> list[float]:
        return [0.0] * len(self._inner.global_features(*args, **kwargs))

    def group_features(self, *args: Any, **kwargs: Any) -> list[float]:
        return [0.0] * len(self._inner.group_features(*args, **kwargs))

    def mean_group_features(self, *args: Any, **kwargs: Any) -> list[float]:
        return [0.0] * len(self._inner.mean_group_features(*args, **kwargs))


class StateBlindRLMetaOptimizer(RLMetaOptimizer):
    """The RL meta-optimizer acting on an all-zero state: the same network and weights, blind.

    A control for the benchmark: if it does as well as the policy that sees the state, the
    policy learned a fixed action distribution (a noisy schedule), not a response to training
    dynamics. Takes exactly :class:`~ray_metaopt.rl.RLMetaOptimizer`'s arguments; the features
    are still computed (for rewards) but the network sees zeros.

    Example:
        >>> meta = StateBlindRLMetaOptimizer(policy_path="policy.pt", frozen=True, total_steps=400)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._features = _ZeroedFeatures(self._features)

