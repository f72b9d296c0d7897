"""The :class:`MetaOptimizer` base class: when to decide, and the interface every strategy follows.

A strategy *decides*: :meth:`MetaOptimizer.decide` looks at its own state, the metrics and a
read-only snapshot of each param group, and returns :class:`HParamUpdate` proposals (target
values). It never writes ``param_groups``: :class:`~ray_metaopt.OptimizerWrapper` *applies* the
proposals (bounds, non-finite guard, scheduler composition, decision log) the same way for every
strategy.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping, Sequence

from ._validation import check_int, check_range, check_real
from .frequency import AdaptiveFrequency
from .metrics import MissingMetricError, first_non_finite

BoundSpec = float | Sequence[float] | Mapping[str, float] | None


@dataclass(frozen=True)
class GroupState:
    """Read-only snapshot of one param group, as a strategy sees it at a decision step.

    Args:
        index: position in ``optimizer.param_groups``.
        name: the group's ``"name"`` entry (``""`` when absent).
        role: the group's ``"role"`` entry (e.g. ``"gate"``/``"expert"``; ``""`` when absent).
        lr: current learning rate.
        weight_decay: current weight decay, or ``None`` when the optimizer has none.
        initial_lr: learning rate when the group was first seen by the wrapper.
        initial_weight_decay: weight decay when the group was first seen (``None`` if absent).
        num_params: number of scalar parameters in the group.
    """

    index: int
    name: str
    role: str
    lr: float
    weight_decay: float | None
    initial_lr: float
    initial_weight_decay: float | None
    num_params: int


@dataclass(frozen=True)
class HParamUpdate:
    """A strategy's proposal: set ``hparam`` of param group ``group`` to ``value`` because ``reason``."""

    group: int
    hparam: str
    value: float
    reason: str


def _check_bound(name: str, value: Any, finite: bool) -> float:
    value = check_range(name, value, 0.0)
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {name}={value!r}")
    return value


def _check_bound_spec(name: str, spec: BoundSpec, *, finite: bool = False) -> BoundSpec:
    """Check a bound in any of its forms; ``finite`` for lower bounds (a bound of inf would be written)."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return {str(k): _check_bound(f"{name}[{k!r}]", v, finite) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [_check_bound(f"{name}[{i}]", v, finite) for i, v in enumerate(spec)]
    return _check_bound(name, spec, finite)


def _resolve_bound(spec: BoundSpec, group: GroupState, default: float) -> float:
    if spec is None:
        return default
    if isinstance(spec, Mapping):
        if group.name in spec:
            return spec[group.name]
        if group.role and group.role in spec:
            return spec[group.role]
        return spec.get("default", default)
    if isinstance(spec, list):
        return spec[group.index] if group.index < len(spec) else default
    return spec


class MetaOptimizer(abc.ABC):
    """Base class of every meta-optimizer: adjusts hyperparameters of an optimizer while it trains.

    Subclasses implement :meth:`decide`, set their learning state (plain data: numbers, strings,
    lists, dicts) in :meth:`_init_state`, list those attributes in ``_state_attrs`` and call
    ``self.reset()`` at the end of ``__init__``; :meth:`state_dict`, :meth:`load_state_dict` and
    :meth:`reset` then work without further code.

    Args:
        update_frequency: decide every this many steps (>= 1). With ``adaptive_frequency`` it is
            the starting interval.
        min_lr: lower bound on any learning rate this strategy sets. A number for every group, a
            list by group index, or a dict by group name or role (key ``"default"`` for the rest).
        max_lr: upper bound on any learning rate this strategy sets (same forms as ``min_lr``).
        max_weight_decay: upper bound on weight decay (same forms as ``min_lr``).
        adaptive_frequency: an :class:`~ray_metaopt.AdaptiveFrequency` (or a dict of its
            arguments) that lengthens the interval on plateaus and shortens it while the loss
            moves fast; ``None`` keeps ``update_frequency`` fixed.

    Example:
        >>> class Halve(MetaOptimizer):
        ...     def decide(self, metrics, step, groups):
        ...         return [HParamUpdate(g.index, "lr", g.lr / 2, "halve") for g in groups]
    """

    _state_attrs: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        update_frequency: int = 1,
        *,
        min_lr: BoundSpec = 0.0,
        max_lr: BoundSpec = None,
        max_weight_decay: BoundSpec = None,
        adaptive_frequency: AdaptiveFrequency | Mapping[str, Any] | None = None,
    ) -> None:
        self.update_frequency = check_int("update_frequency", update_frequency, minimum=1)
        self.min_lr = _check_bound_spec("min_lr", min_lr, finite=True)
        self.max_lr = _check_bound_spec("max_lr", max_lr)
        if isinstance(self.min_lr, float) and isinstance(self.max_lr, float) and self.min_lr > self.max_lr:
            raise ValueError(f"min_lr must be <= max_lr, got min_lr={min_lr!r}, max_lr={max_lr!r}")
        self.max_weight_decay = _check_bound_spec("max_weight_decay", max_weight_decay)
        self.adaptive_frequency = AdaptiveFrequency.from_config(adaptive_frequency)
        self._reset_schedule()

    # ----------------------------------------------------------------- scheduling
    def _reset_schedule(self) -> None:
        self.interval = self.update_frequency
        self.next_update_step = self.update_frequency - 1
        self.last_update_step: int | None = None
        self._last_monitored: float | None = None

    def should_update(self, step: int) -> bool:
        """Whether a decision is due at ``step`` (0-based; the first comes after ``update_frequency`` steps).

        A pure question about ``step``: due at ``next_update_step`` and every ``interval`` steps
        after it until a decision is made (a missed step does not make every later step due), and
        asking changes nothing. (The wrapper adds one exception: after it skipped a decision for a
        non-finite metric, it retries at each following step until one decides.)
        """
        if step < self.next_update_step:
            return False
        return (step - self.next_update_step) % self.interval == 0

    # ----------------------------------------------------------------- deciding
    def update_hparams(
        self, metrics: Mapping[str, float], step: int, groups: Sequence[GroupState] = ()
    ) -> list[HParamUpdate]:
        """Decide at ``step`` from ``metrics`` (floats) and the param groups' snapshots.

        Returns the proposed changes; nothing is written here. A non-finite metric skips the
        decision (no state changes, empty list) and the next step is due again.
        """
        if first_non_finite(metrics) is not None:
            return []
        if getattr(self, "_atomic_outside", False):  # the caller restores the state on failure
            return self._decide_and_schedule(metrics, step, groups)
        with self.atomic():
            return self._decide_and_schedule(metrics, step, groups)

    def _decide_and_schedule(
        self, metrics: Mapping[str, float], step: int, groups: Sequence[GroupState]
    ) -> list[HParamUpdate]:
        try:
            updates = list(self.decide(metrics, step, groups))
        except MissingMetricError:
            raise
        except KeyError as e:
            key = e.args[0] if e.args else None
            message = key if isinstance(key, str) and " " in key else f"metric {key!r} is missing"
            raise MissingMetricError(
                f"{message} (metrics at step {step}: {sorted(metrics)})", key
            ) from e
        self._schedule_after(metrics, step)
        return updates

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """Restore this strategy's state when the block raises: a decision applies fully or not at all."""
        snapshot = self.state_dict()
        try:
            yield
        except BaseException:
            self.load_state_dict(snapshot)
            raise

    @abc.abstractmethod
    def decide(
        self, metrics: Mapping[str, float], step: int, groups: Sequence[GroupState]
    ) -> Sequence[HParamUpdate]:
        """Return the hyperparameter changes to make now. ``metrics`` are finite floats."""

    def _schedule_after(self, metrics: Mapping[str, float], step: int) -> None:
        adaptive = self.adaptive_frequency
        if adaptive is not None:
            current = metrics.get(adaptive.monitor)
            steps = step - self.last_update_step if self.last_update_step is not None else 0
            self.interval = adaptive.next_interval(self.interval, self._last_monitored, current, steps)
            self._last_monitored = current
        self.last_update_step = step
        self.next_update_step = step + self.interval

    # ----------------------------------------------------------------- bounds
    def lr_bounds(self, group: GroupState) -> tuple[float, float]:
        return _resolve_bound(self.min_lr, group, 0.0), _resolve_bound(self.max_lr, group, math.inf)

    def weight_decay_bounds(self, group: GroupState) -> tuple[float, float]:
        return 0.0, _resolve_bound(self.max_weight_decay, group, math.inf)

    def check_groups(self, groups: Sequence[GroupState]) -> None:
        """Raise ``ValueError`` when per-group settings do not match the optimizer's param groups."""
        for g in groups:
            low, high = self.lr_bounds(g)
            if low > high:
                label = f"param group {g.index}" + (f" ({g.name!r})" if g.name else "")
                raise ValueError(f"min_lr must be <= max_lr, got min_lr={low!r} > max_lr={high!r} for {label}")
        names = {g.name for g in groups} | {g.role for g in groups} | {"default"}
        for arg in ("min_lr", "max_lr", "max_weight_decay"):
            spec = getattr(self, arg)
            if isinstance(spec, Mapping):
                unknown = sorted(set(spec) - names)
                if unknown:
                    known = sorted(n for n in names if n)
                    raise ValueError(f"{arg} names unknown param groups {unknown}; groups and roles are {known}")
            elif isinstance(spec, list) and len(spec) != len(groups):
                raise ValueError(
                    f"{arg} has {len(spec)} entries but the optimizer has {len(groups)} param groups, "
                    f"got {arg}={spec}"
                )

    # ----------------------------------------------------------------- state
    def _learning_state(self) -> dict[str, Any]:
        return {attr: copy.deepcopy(getattr(self, attr)) for attr in self._state_attrs}

    def _init_state(self) -> None:
        """Set the attributes named in ``_state_attrs`` to their values before any metric was seen."""

    def reset(self) -> None:
        """Forget everything learned from metrics (plateau counters, histories, the schedule)."""
        self._init_state()
        self._reset_schedule()

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (loads with ``torch.load(..., weights_only=True)``)."""
        return {
            "type": type(self).__name__,
            "interval": self.interval,
            "next_update_step": self.next_update_step,
            "last_update_step": self.last_update_step,
            "last_monitored": self._last_monitored,
            "state": self._learning_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict`'s output; everything is checked first, so a rejected state changes nothing."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping from state_dict(), got state={state!r}")
        if state.get("type") != type(self).__name__:
            raise ValueError(
                f"state_dict is for {state.get('type')!r}, cannot load it into {type(self).__name__}"
            )
        missing = [k for k in ("interval", "next_update_step", "last_update_step", "last_monitored", "state") if k not in state]
        if missing:
            raise ValueError(f"{type(self).__name__} state_dict lacks {missing}")
        learning = state["state"]
        if not isinstance(learning, Mapping):
            raise ValueError(f"{type(self).__name__} state_dict['state'] must be a mapping, got {learning!r}")
        for attr in learning:
            if attr not in self._state_attrs:
                raise ValueError(f"unexpected entry {attr!r} in {type(self).__name__} state_dict")
        interval = check_int("state_dict['interval']", state["interval"], minimum=1)
        next_update_step = check_int("state_dict['next_update_step']", state["next_update_step"])
        last = state["last_update_step"]
        if last is not None:
            last = check_int("state_dict['last_update_step']", last)
        monitored = state["last_monitored"]
        if monitored is not None:
            monitored = check_real("state_dict['last_monitored']", monitored)
        learning = copy.deepcopy(dict(learning))
        self.interval = interval
        self.next_update_step = next_update_step
        self.last_update_step = last
        self._last_monitored = monitored
        for attr, value in learning.items():
            setattr(self, attr, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(update_frequency={self.update_frequency})"
