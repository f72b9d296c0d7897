"""Argument checks shared by every public constructor.

Each helper raises ``TypeError`` for a wrong type and ``ValueError`` for a bad value, naming the
argument and the value received (``"lr_factor must be in (0, 1), got lr_factor=1.5"``).
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Callable, Mapping


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_real(name: str, value: Any) -> float:
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {name}={value!r} ({type(value).__name__})")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN, got {name}={value!r}")
    return value


def check_finite(name: str, value: Any) -> float:
    value = check_real(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {name}={value!r}")
    return value


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {name}={value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")
    return value


def check_range(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Check ``low <= value <= high`` (each end open when asked) and return ``float(value)``."""
    value = check_real(name, value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {left}{low:g}, {high:g}{right}, got {name}={value!r}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {name}={value!r}")
    return value


def check_path(name: str, value: Any) -> str:
    """A non-empty ``str`` or ``os.PathLike`` (a local path or a pyarrow URI); returns it as ``str``."""
    import os

    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {name}={value!r} ({type(value).__name__})")
    path = os.fspath(value)
    if not isinstance(path, str) or not path:
        raise ValueError(f"{name} must be a non-empty path, got {name}={value!r}")
    return path


def check_optional_mapping(name: str, value: Any) -> Any:
    """``None`` or a mapping (e.g. a config dict)."""
    from collections.abc import Mapping

    if value is not None and not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict or None, got {name}={value!r} ({type(value).__name__})")
    return value


def accepted_kwargs(factory: Callable) -> set[str] | None:
    """Keyword arguments ``factory`` takes, following ``**kwargs`` up a class's bases; None if unknown."""
    targets = (
        [c.__init__ for c in factory.__mro__ if "__init__" in vars(c)]
        if inspect.isclass(factory)
        else [factory]
    )
    accepted: set[str] = set()
    for target in targets:
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):
            return None
        accepted |= {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return accepted - {"self"}
    return None  # **kwargs all the way up: anything may be accepted


def check_known_keys(
    name: str, config: Mapping[str, Any], accepted: set[str] | None, what: str, *, hidden: tuple[str, ...] = ()
) -> None:
    """Reject keys of ``config`` (the argument ``name``) that ``what`` does not accept.

    ``accepted`` is from :func:`accepted_kwargs` (``None``: anything goes); ``hidden`` names are
    accepted but not listed (the caller sets them).
    """
    if accepted is None:
        return
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise ValueError(
            f"{name} has keys {unknown} that {what} does not accept; "
            f"accepted keys are {sorted(accepted - set(hidden))}"
        )
