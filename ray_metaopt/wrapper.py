"""The :class:`OptimizerWrapper`: any ``torch.optim.Optimizer`` plus a meta-optimizer that adjusts it."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Mapping, Sequence

import torch

from .base import GroupState, HParamUpdate, MetaOptimizer
from .history import Decision, DecisionLog, SkippedDecision, check_max_records
from .metrics import MetricAccumulator, check_metrics, first_non_finite, to_float

# Keys the wrapper adds to the wrapped optimizer's state_dict.
_META_KEYS = ("meta_optimizer", "meta_wrapper")


def _stored_within(current: Any, value: float, low: float, high: float) -> float | None:
    """The value a write of ``value`` stores into ``current``'s type, kept within ``[low, high]``.

    A Python float stores ``value`` as it is. A tensor stores it in its own dtype (a float32 lr
    rounds ``1e-4`` down to ``9.9999997e-05``): the stored value is moved to the next
    representable one inside the bounds. ``None`` when no finite stored value lies within them.
    """
    if not isinstance(current, torch.Tensor):
        return value
    dtype = current.dtype if current.is_floating_point() else torch.float64
    t = torch.tensor(value, dtype=dtype)
    if float(t) < low:
        t = torch.nextafter(t, torch.tensor(math.inf, dtype=dtype))
    elif float(t) > high:
        t = torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype))
    stored = float(t)
    if not (math.isfinite(stored) and low <= stored <= high):
        return None
    return stored


class OptimizerWrapper(torch.optim.Optimizer):
    """Wraps a ``torch.optim.Optimizer`` and applies a :class:`MetaOptimizer`'s decisions to it.

    The wrapper *is* an ``Optimizer``: ``param_groups``, ``state``, ``defaults``, ``zero_grad``,
    ``step(closure)``, ``add_param_group`` and the state dict pass through to the wrapped
    optimizer, so torch LR schedulers, ``GradScaler`` and checkpoint code accept it as they are.

    Applying a decision: the proposed value is clamped to the strategy's per-group bounds and
    written to ``param_groups[i]``; a non-finite proposal or metric is never written (the
    decision is skipped and logged). Every change is recorded in :attr:`log`.

    Composition with a torch LR scheduler (see :meth:`attach_scheduler`): the scheduler owns the
    *shape* of the schedule and the meta-optimizer owns a *multiplier* on it. When the
    meta-optimizer changes a group's lr from ``old`` to ``new``, the attached schedulers'
    ``base_lrs`` (and the group's ``initial_lr``) are scaled by ``new / old`` too, so the schedule
    continues from the changed value: a plateau cut on a cosine schedule stays cut, and the cosine
    keeps its shape. Without ``attach_scheduler``, schedulers that recompute the lr from
    ``base_lrs`` (``LambdaLR``, ``OneCycleLR``, ``CosineAnnealingWarmRestarts``...) overwrite
    meta-optimizer changes at their next step.

    Args:
        optimizer: the optimizer to wrap.
        meta_optimizer: the strategy that decides hyperparameter changes.
        metric_reduction: ``"last"`` (decide on the latest metrics) or ``"mean"`` (on the mean
            of every value reported since the previous decision).
        max_log_records: how many decisions to keep in :attr:`log` (``None``: all).

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = OptimizerWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3),
        ...                        PlateauMetaOptimizer(patience=3, lr_factor=0.5))
        >>> loss = model(torch.randn(8, 4)).pow(2).mean(); loss.backward()
        >>> opt.update_hyperparameters({"loss": loss.detach()}); opt.step()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        meta_optimizer: MetaOptimizer,
        *,
        metric_reduction: str = "last",
        max_log_records: int | None = 10_000,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got optimizer={optimizer!r} ({type(optimizer).__name__})"
            )
        if isinstance(optimizer, OptimizerWrapper):
            raise TypeError("optimizer is already an OptimizerWrapper; wrap the underlying optimizer once")
        if not isinstance(meta_optimizer, MetaOptimizer):
            raise TypeError(
                f"meta_optimizer must be a MetaOptimizer, got meta_optimizer={meta_optimizer!r} "
                f"({type(meta_optimizer).__name__})"
            )
        self.log = DecisionLog(check_max_records("max_log_records", max_log_records))
        self.optimizer = optimizer
        self.meta_optimizer = meta_optimizer
        self._metrics = MetricAccumulator(metric_reduction)
        self._schedulers: list[Any] = []
        self._step_count = 0
        self._retry = False  # a decision was skipped for a non-finite metric: retry at the next step
        self._initial: list[tuple[float, float | None]] = []
        self._record_initial_values()
        # The same hook tables torch.optim.Optimizer.__init__ creates, so hooks registered on the
        # wrapper (register_step_pre_hook, state-dict hooks) work as on any optimizer.
        self._optimizer_step_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._patch_step_function()
        meta_optimizer.check_groups(self.group_states())

    # ------------------------------------------------------------ pass-through
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes the wrapper lacks, e.g. _step_supports_amp_scaling.
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def _step(self, closure: Callable[[], float] | None = None) -> Any:
        return self._inner_step(closure)

    # torch's own step decorator: profiler record, then global pre hooks, the wrapper's pre hooks,
    # the step, the wrapper's post hooks and the global post hooks, each called with the wrapper.
    step = torch.optim.Optimizer.profile_hook_step(_step)
    step.hooked = True  # type: ignore[attr-defined]  # keeps torch's _patch_step_function off it

    def _inner_step(self, closure: Callable[[], float] | None) -> Any:
        """The wrapped optimizer's step with its own hooks, without the global hooks a second time
        (they ran once, with the wrapper, around this call)."""
        inner = self.optimizer
        kwargs: dict[str, Any] = {} if closure is None else {"closure": closure}
        bound = inner.step
        raw = getattr(type(inner).step, "__wrapped__", None)
        if raw is None or not getattr(type(inner).step, "hooked", False):
            return bound(**kwargs)  # a step torch did not decorate: nothing global runs in it
        args: tuple[Any, ...] = (inner,)
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(inner).__name__}.step"):
            for pre_hook in inner._optimizer_step_pre_hooks.values():
                result = pre_hook(inner, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(
                            f"{pre_hook} must return None or a tuple of (new_args, new_kwargs), but got {result}."
                        )
                    args, kwargs = result
            out = raw(*args, **kwargs)
            inner._optimizer_step_code()
            for post_hook in inner._optimizer_step_post_hooks.values():
                post_hook(inner, args, kwargs)
        if hasattr(bound, "_wrapped_by_lr_sched"):
            inner._opt_called = True  # what a scheduler built on the inner optimizer checks
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._record_initial_values()
        self.meta_optimizer.check_groups(self.group_states())

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"OptimizerWrapper({self.optimizer!r}, {self.meta_optimizer!r})"

    # ------------------------------------------------------------ schedulers
    def attach_scheduler(self, scheduler: Any) -> Any:
        """Make meta-optimizer lr changes persist through ``scheduler`` (see class doc). Returns it."""
        if getattr(scheduler, "optimizer", None) is not self and getattr(scheduler, "optimizer", None) is not self.optimizer:
            raise ValueError("scheduler was built on another optimizer; build it on this wrapper")
        if not hasattr(scheduler, "base_lrs"):
            raise TypeError(
                f"scheduler must be a torch LRScheduler with base_lrs, got {type(scheduler).__name__}"
            )
        self._schedulers.append(scheduler)
        return scheduler

    # ------------------------------------------------------------ deciding and applying
    def _record_initial_values(self) -> None:
        for group in self.param_groups[len(self._initial):]:
            wd = group.get("weight_decay")
            self._initial.append((to_float(group["lr"]), None if wd is None else to_float(wd)))

    def group_states(self) -> list[GroupState]:
        """Read-only snapshots of every param group (what strategies decide on)."""
        states = []
        for i, group in enumerate(self.param_groups):
            wd = group.get("weight_decay")
            initial_lr, initial_wd = self._initial[i]
            states.append(
                GroupState(
                    index=i,
                    name=str(group.get("name", "")),
                    role=str(group.get("role", "")),
                    lr=to_float(group["lr"]),
                    weight_decay=None if wd is None else to_float(wd),
                    initial_lr=initial_lr,
                    initial_weight_decay=initial_wd,
                    num_params=sum(p.numel() for p in group["params"]),
                )
            )
        return states

    @property
    def step_count(self) -> int:
        """Number of ``update_hyperparameters`` calls so far (the next implicit step)."""
        return self._step_count

    def update_hyperparameters(self, metrics: Mapping[str, Any], step: int | None = None) -> list[Decision]:
        """Report this step's metrics; at decision steps, decide and apply hyperparameter changes.

        Args:
            metrics: name -> Python number or one-element tensor (e.g. ``{"loss": loss.detach(),
                "grad_norm": clip_grad_norm_(...)}``). Tensors are read only at decision steps.
            step: the training step; by default an internal counter (0, 1, 2, ...).

        Returns:
            The decisions applied now (empty on most steps).
        """
        before = (self._step_count, self._metrics.snapshot(), self._retry)
        try:
            step, values = self._collect(metrics, step)
            if values is None:
                return []
            bad = first_non_finite(values)
            if bad is not None:
                self.log.add_skipped(SkippedDecision(step, f"non-finite metric {bad}={values[bad]}"))
                self._retry = True
                return []
            return self._decide_and_apply(values, step)
        except BaseException:
            # A rejected call changes nothing: the next call sees the wrapper as it was.
            self._step_count = before[0]
            self._metrics.restore(before[1])
            self._retry = before[2]
            raise

    def _decide_and_apply(self, values: dict[str, float], step: int) -> list[Decision]:
        """Decide on finite ``values`` and apply the result, all or nothing: when deciding or
        applying raises, the strategy's state and the param groups are as they were."""
        meta = self.meta_optimizer
        groups = self.group_states()
        with meta.atomic():
            meta._atomic_outside = True
            try:
                updates = meta.update_hparams(values, step, groups)
            finally:
                meta._atomic_outside = False
            plan = self._plan_updates(updates, step, groups)
        self._retry = False
        return self._apply_plan(plan, step, groups)

    def _collect(self, metrics: Mapping[str, Any], step: int | None) -> tuple[int, dict[str, float] | None]:
        """Check and accumulate one step's metrics; at a decision step, also read them (the only
        host sync). Returns the step and the reduced metrics, or ``None`` between decisions."""
        check_metrics(metrics)
        if step is None:
            step = self._step_count
        elif isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise TypeError(f"step must be a non-negative int or None, got step={step!r}")
        self._step_count = step + 1
        self._metrics.add(metrics)
        meta = self.meta_optimizer
        if not (meta.should_update(step) or (self._retry and step >= meta.next_update_step)):
            return step, None
        values = self._metrics.reduce()
        self._metrics.clear()
        return step, values

    def apply_updates(
        self, updates: list[HParamUpdate], step: int, groups: list[GroupState] | None = None
    ) -> list[Decision]:
        """Write proposals to ``param_groups`` within bounds, log them, and keep schedulers in step.

        Every proposal is checked before anything is written, so a bad one changes nothing.
        """
        groups = self.group_states() if groups is None else groups
        return self._apply_plan(self._plan_updates(updates, step, groups), step, groups)

    def _plan_updates(
        self, updates: Sequence[HParamUpdate], step: int, groups: list[GroupState]
    ) -> list[tuple[HParamUpdate, float | None, str | None]]:
        """Check every proposal and work out the value each write stores (or why it is skipped)."""
        name = type(self.meta_optimizer).__name__
        plan = []
        for update in updates:
            if not isinstance(update, HParamUpdate):
                raise TypeError(f"{name} proposed {update!r}, which is not an HParamUpdate")
            if isinstance(update.group, bool) or not isinstance(update.group, int) or not 0 <= update.group < len(self.param_groups):
                raise ValueError(
                    f"{name} proposed a change to param group {update.group}, "
                    f"but the optimizer has {len(self.param_groups)} groups"
                )
            group = self.param_groups[update.group]
            if update.hparam not in group:
                raise ValueError(
                    f"{name} proposed {update.hparam!r} for param group "
                    f"{update.group}, which has no such hyperparameter"
                )
            try:
                value = float(update.value)
            except (TypeError, ValueError, OverflowError) as e:
                raise TypeError(
                    f"{name} proposed {update.hparam}={update.value!r} for group {update.group}, not a number"
                ) from e
            state = groups[update.group]
            if update.hparam == "lr":
                low, high = self.meta_optimizer.lr_bounds(state)
            elif update.hparam == "weight_decay":
                low, high = self.meta_optimizer.weight_decay_bounds(state)
            else:
                low, high = -math.inf, math.inf
            if not math.isfinite(value):
                plan.append((update, None, f"non-finite proposal {update.hparam}={value} for group {update.group}"))
                continue
            stored = _stored_within(group[update.hparam], min(max(value, low), high), low, high)
            if stored is None:
                plan.append((update, None, (
                    f"proposal {update.hparam}={value} for group {update.group}: no finite value within "
                    f"[{low}, {high}] can be stored in {group[update.hparam]!r}"
                )))
                continue
            plan.append((update, stored, None))
        return plan

    def _apply_plan(
        self, plan: list[tuple[HParamUpdate, float | None, str | None]], step: int, groups: list[GroupState]
    ) -> list[Decision]:
        applied = []
        for update, new, skipped in plan:
            if new is None:
                self.log.add_skipped(SkippedDecision(step, str(skipped)))
                continue
            group = self.param_groups[update.group]
            old = to_float(group[update.hparam])
            if new == old:
                continue
            if isinstance(group[update.hparam], torch.Tensor):
                group[update.hparam].fill_(new)
            else:
                group[update.hparam] = new
            if update.hparam == "lr" and old > 0:
                self._rescale_schedule(update.group, new / old)
            decision = Decision(step, update.group, groups[update.group].name, update.hparam, old, new, update.reason)
            self.log.add(decision)
            applied.append(decision)
        return applied

    def _rescale_schedule(self, index: int, factor: float) -> None:
        """Keep attached schedules in step with a meta-optimizer lr change by ``factor``."""
        self._rescale_schedule_anchors(index, lambda anchor: anchor * factor)

    def _rescale_schedule_anchors(self, index: int, rescale: Callable[[float], float], schedulers=()) -> None:
        group = self.param_groups[index]
        if "initial_lr" in group and not isinstance(group["initial_lr"], torch.Tensor):
            group["initial_lr"] = rescale(group["initial_lr"])
        for scheduler in {id(s): s for s in [*self._schedulers, *schedulers]}.values():
            if index < len(scheduler.base_lrs):
                scheduler.base_lrs[index] = rescale(scheduler.base_lrs[index])

    def rescale_anchors(
        self,
        index: int,
        hparam: str,
        *,
        factor: float | None = None,
        value: float | None = None,
        schedulers: Sequence[Any] = (),
    ) -> None:
        """Scale by ``factor`` (or set to ``value``) the anchors relative rules use for one group.

        The anchors are the value of ``hparam`` that strategies see as ``GroupState.initial_*``
        and, for ``"lr"``, the group's ``initial_lr`` and the ``base_lrs`` entry of every attached
        scheduler (plus ``schedulers``). Use it when something other than the meta-optimizer
        changes a group's value for good, e.g. a PBT-perturbed config restored from a checkpoint.

        Args:
            index: the param group.
            hparam: ``"lr"`` or ``"weight_decay"``.
            factor: multiply each anchor by this (> 0).
            value: set each anchor to this instead (exactly one of ``factor`` / ``value``).
            schedulers: schedulers not attached to the wrapper whose ``base_lrs`` follow too.
        """
        if hparam not in ("lr", "weight_decay"):
            raise ValueError(f"hparam must be 'lr' or 'weight_decay', got hparam={hparam!r}")
        if (factor is None) == (value is None):
            raise ValueError(f"give exactly one of factor and value, got factor={factor!r}, value={value!r}")
        if not 0 <= index < len(self.param_groups):
            raise ValueError(f"index must be a param group index < {len(self.param_groups)}, got index={index!r}")

        def rescale(anchor: float) -> float:
            return anchor * factor if factor is not None else float(value)

        lr0, wd0 = self._initial[index]
        if hparam == "lr":
            self._initial[index] = (rescale(lr0), wd0)
            self._rescale_schedule_anchors(index, rescale, schedulers)
        elif wd0 is not None:
            self._initial[index] = (lr0, rescale(wd0))

    # ------------------------------------------------------------ history
    @property
    def decisions(self) -> list[Decision]:
        """Every recorded decision, oldest first."""
        return list(self.log)

    # ------------------------------------------------------------ checkpoints
    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus the meta-optimizer's and the wrapper's state.

        Everything is tensors or plain data, so ``torch.load(path, weights_only=True)`` loads it.
        Hooks registered with ``register_state_dict_pre_hook`` / ``_post_hook`` run as on any
        optimizer (called with the wrapper; a post hook may return a new state dict).
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self.optimizer.state_dict()
        state["meta_optimizer"] = self.meta_optimizer.state_dict()
        state["meta_wrapper"] = {
            "step_count": self._step_count,
            "retry": self._retry,
            "initial": [list(v) for v in self._initial],
            "metrics": self._metrics.state_dict(),
            "log": self.log.state_dict(),
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            if result is not None:
                state = result
        return state

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain optimizer state dict: then only
        the wrapped optimizer is restored and the meta-optimizer keeps its state).

        Load pre hooks (which may return a new state dict) run first and load post hooks last, as
        on any optimizer. Everything is checked before anything is written: a rejected state dict
        raises and leaves the wrapper, its optimizer and its strategy as they were.
        """
        state = state_dict.copy()  # shallow, as torch does
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state)
            if result is not None:
                state = result
        state = dict(state)
        meta_state = state.pop("meta_optimizer", None)
        wrapper_state = state.pop("meta_wrapper", None)
        wrapper_parsed = None if wrapper_state is None else self._check_wrapper_state(wrapper_state)
        self._check_optimizer_state(state)
        meta_before = self.meta_optimizer.state_dict()
        if meta_state is not None:
            self.meta_optimizer.load_state_dict(meta_state)  # checks everything before it writes
        try:
            self.optimizer.load_state_dict(state)
        except BaseException:
            self.meta_optimizer.load_state_dict(meta_before)
            raise
        if wrapper_parsed is not None:
            step_count, initial, metrics, log_state = wrapper_parsed
            self._step_count = step_count
            self._retry = bool(wrapper_state.get("retry", False))
            self._initial = initial
            self._metrics.reduction, self._metrics._values, self._metrics._counts = metrics
            self.log.load_state_dict(log_state)
        self._record_initial_values()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_wrapper_state(self, wrapper_state: Any) -> tuple[Any, ...]:
        """Parse the ``meta_wrapper`` entry without loading it (raises ``ValueError`` when malformed)."""
        try:
            step_count = int(wrapper_state["step_count"])
            initial = [(float(lr), None if wd is None else float(wd)) for lr, wd in wrapper_state["initial"]]
            metrics = MetricAccumulator.check_state_dict(wrapper_state["metrics"])
            log_state = wrapper_state["log"]
            DecisionLog(None).load_state_dict(log_state)  # a throwaway log: checks it
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"state_dict['meta_wrapper'] is malformed: {e}") from e
        if step_count < 0:
            raise ValueError(f"state_dict['meta_wrapper']['step_count'] must be >= 0, got {step_count}")
        if len(initial) > len(self.param_groups):
            raise ValueError(
                f"state_dict['meta_wrapper'] records {len(initial)} param groups, the optimizer has {len(self.param_groups)}"
            )
        return step_count, initial, metrics, log_state

    def _check_optimizer_state(self, state: Mapping[str, Any]) -> None:
        """The checks ``torch.optim.Optimizer.load_state_dict`` makes before it writes, made first."""
        if "param_groups" not in state or "state" not in state:
            raise ValueError(f"state_dict must have 'state' and 'param_groups', got keys {sorted(state)}")
        saved = state["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved)} parameter groups, the optimizer has {len(self.param_groups)}"
            )
        for i, (group, saved_group) in enumerate(zip(self.param_groups, saved)):
            if len(group["params"]) != len(saved_group["params"]):
                raise ValueError(
                    f"loaded state dict's parameter group {i} has {len(saved_group['params'])} parameters, "
                    f"the optimizer's has {len(group['params'])}"
                )
