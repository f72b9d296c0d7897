"""The record of every hyperparameter change a meta-optimizer made, and of every skipped decision."""

from __future__ import annotations

import numbers
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Iterator


@dataclass(frozen=True)
class Decision:
    """One hyperparameter change, as applied to ``optimizer.param_groups[group]``.

    Args:
        step: the training step at which the decision was made.
        group: index of the param group that changed.
        name: the group's ``"name"`` entry, or ``""`` when it has none.
        hparam: the hyperparameter key (``"lr"``, ``"weight_decay"``, ...).
        old: value before the change.
        new: value after the change (after bounds were applied).
        reason: why the strategy changed it, in words (``"plateau: 3 evals without improvement"``).
    """

    step: int
    group: int
    name: str
    hparam: str
    old: float
    new: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SkippedDecision:
    """A decision step at which nothing was decided, and why (e.g. a non-finite metric)."""

    step: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_max_records(name: str, value: Any) -> int | None:
    """``None`` or an int >= 0 (how many log records to keep)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 0 or None, got {name}={value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 or None, got {name}={value!r}")
    return int(value)


class DecisionLog:
    """Bounded, checkpointable log of :class:`Decision` and :class:`SkippedDecision` records.

    Args:
        max_records: how many records of each kind to keep (oldest dropped first); the totals
            ``num_decisions`` / ``num_skipped`` keep counting past it. ``None`` keeps all.

    Example:
        >>> log = DecisionLog()
        >>> log.add(Decision(10, 0, "", "lr", 1e-3, 5e-4, "plateau"))
        >>> [d.new for d in log.decisions(hparam="lr")]
        [0.0005]
    """

    def __init__(self, max_records: int | None = 10_000) -> None:
        max_records = check_max_records("max_records", max_records)
        self._decisions: deque[Decision] = deque(maxlen=max_records)
        self._skipped: deque[SkippedDecision] = deque(maxlen=max_records)
        self.num_decisions = 0
        self.num_skipped = 0

    def add(self, decision: Decision) -> None:
        self._decisions.append(decision)
        self.num_decisions += 1

    def add_skipped(self, skipped: SkippedDecision) -> None:
        self._skipped.append(skipped)
        self.num_skipped += 1

    def decisions(self, *, hparam: str | None = None, group: int | None = None) -> list[Decision]:
        return [
            d
            for d in self._decisions
            if (hparam is None or d.hparam == hparam) and (group is None or d.group == group)
        ]

    @property
    def skipped(self) -> list[SkippedDecision]:
        return list(self._skipped)

    def __iter__(self) -> Iterator[Decision]:
        return iter(self._decisions)

    def __len__(self) -> int:
        return len(self._decisions)

    def state_dict(self) -> dict[str, Any]:
        return {
            "decisions": [d.to_dict() for d in self._decisions],
            "skipped": [s.to_dict() for s in self._skipped],
            "num_decisions": self.num_decisions,
            "num_skipped": self.num_skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load :meth:`state_dict`'s output; a malformed state raises and changes nothing."""
        try:
            decisions = [Decision(**d) for d in state["decisions"]]
            skipped = [SkippedDecision(**s) for s in state["skipped"]]
            num_decisions = int(state["num_decisions"])
            num_skipped = int(state["num_skipped"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed decision log state: {e}") from e
        self._decisions.clear()
        self._skipped.clear()
        self._decisions.extend(decisions)
        self._skipped.extend(skipped)
        self.num_decisions = num_decisions
        self.num_skipped = num_skipped
