"""Collecting training metrics between decision steps without forcing a host sync.

Metrics may be Python numbers, numpy scalars or one-element tensors (such as the tensor that
``torch.nn.utils.clip_grad_norm_`` returns). Tensors stay where they are until a decision step
reads them, so a CUDA training loop is not synchronised on the other steps.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import torch

from ._validation import check_choice

REDUCTIONS = ("last", "mean")


class MissingMetricError(KeyError, ValueError):
    """A metric a strategy needs was not reported. A ``ValueError`` like every other bad metric
    (and a ``KeyError``, for code written against earlier versions)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "missing metric"


def check_metrics(metrics: Any) -> Mapping[str, Any]:
    """Type-check a metrics mapping (cheap: never reads a tensor's value).

    Raises ``TypeError`` / ``ValueError`` naming the metric; nothing is accumulated on a rejected call.
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of name to number, got metrics={metrics!r}")
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"metric names must be str, got {key!r} ({type(key).__name__})")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise TypeError(
                    f"metric {key!r} must be a number or a one-element tensor, "
                    f"got a tensor of shape {tuple(value.shape)}"
                )
            if value.is_complex() or value.dtype == torch.bool:
                raise TypeError(
                    f"metric {key!r} must be a real number or a real one-element tensor, "
                    f"got a tensor of dtype {value.dtype}"
                )
            if value.device.type == "meta":
                raise ValueError(f"metric {key!r} is a tensor on the meta device, which has no value")
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"metric {key!r} must be a number or a one-element tensor, "
                f"got {key}={value!r} ({type(value).__name__})"
            )
        else:
            try:
                float(value)
            except (OverflowError, ValueError) as e:
                raise ValueError(
                    f"metric {key!r} does not fit a float, got {key}={_short(value)} ({type(value).__name__})"
                ) from e
    return metrics


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-10:]} ({len(text)} chars)"


def to_float(value: Any) -> float:
    """A number or one-element tensor as a Python float (a tensor is synchronised here)."""
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Read every metric as a Python float (this is where tensors are synchronised)."""
    return {k: to_float(v) for k, v in metrics.items()}


def first_non_finite(metrics: Mapping[str, float]) -> str | None:
    """Name of the first non-finite metric, or None when all are finite."""
    for key, value in metrics.items():
        if not math.isfinite(value):
            return key
    return None


class MetricAccumulator:
    """Holds the metrics seen since the last decision step.

    Args:
        reduction: ``"last"`` keeps the latest value of each metric (no work per step);
            ``"mean"`` averages every value seen since the last decision (one device add per
            tensor metric per step, still no host sync).

    Example:
        >>> acc = MetricAccumulator("mean")
        >>> acc.add({"loss": 2.0}); acc.add({"loss": torch.tensor(4.0)})
        >>> acc.reduce()
        {'loss': 3.0}
    """

    def __init__(self, reduction: str = "last") -> None:
        self.reduction = check_choice("metric_reduction", reduction, REDUCTIONS)
        self._values: dict[str, Any] = {}
        self._counts: dict[str, int] = {}

    def add(self, metrics: Mapping[str, Any]) -> None:
        if self.reduction == "last":
            for key, value in metrics.items():
                if isinstance(value, torch.Tensor):
                    self._values[key] = value.detach() if value.requires_grad else value
                else:
                    self._values[key] = float(value)
            return
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().to(torch.float64 if value.device.type == "cpu" else torch.float32)
            else:
                value = float(value)
            if key in self._values:
                self._values[key] = self._values[key] + value
                self._counts[key] += 1
            else:
                self._values[key] = value
                self._counts[key] = 1

    def reduce(self) -> dict[str, float]:
        values = to_floats(self._values)
        if self.reduction == "mean":
            values = {k: v / self._counts[k] for k, v in values.items()}
        return values

    def clear(self) -> None:
        self._values.clear()
        self._counts.clear()

    def __len__(self) -> int:
        return len(self._values)

    def snapshot(self) -> tuple[dict[str, Any], dict[str, int]]:
        """The accumulated values as they are now, for :meth:`restore` (values are never mutated in place)."""
        return dict(self._values), dict(self._counts)

    def restore(self, snapshot: tuple[dict[str, Any], dict[str, int]]) -> None:
        self._values, self._counts = dict(snapshot[0]), dict(snapshot[1])

    def state_dict(self) -> dict[str, Any]:
        return {"reduction": self.reduction, "values": to_floats(self._values), "counts": dict(self._counts)}

    @staticmethod
    def check_state_dict(state: Any) -> tuple[str, dict[str, float], dict[str, int]]:
        """Check a :meth:`state_dict` without loading it; returns what :meth:`load_state_dict` sets."""
        if not isinstance(state, Mapping) or not {"reduction", "values", "counts"} <= set(state):
            raise ValueError(f"metric accumulator state must have reduction, values and counts, got {state!r}")
        reduction = check_choice("metric_reduction", state["reduction"], REDUCTIONS)
        values, counts = state["values"], state["counts"]
        if not isinstance(values, Mapping) or not isinstance(counts, Mapping):
            raise ValueError(f"metric accumulator values and counts must be mappings, got {values!r}, {counts!r}")
        check_metrics(values)
        return reduction, to_floats(values), {str(k): int(v) for k, v in counts.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reduction, self._values, self._counts = self.check_state_dict(state)
