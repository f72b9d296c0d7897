"""The lr schedule shapes, one table for the trainable's schedules and the RL policy's base.

Each shape maps training progress ``p`` in ``[0, 1]`` to a factor of the initial lr that falls
from 1 (a schedule to ``final_factor`` is ``final + (1 - final) * shape(p)``).

Example:
    >>> SCHEDULE_SHAPES["cosine"](0.5)
    0.5
"""

from __future__ import annotations

import math
from typing import Callable

SCHEDULE_SHAPES: dict[str, Callable[[float], float]] = {
    "constant": lambda p: 1.0,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "linear": lambda p: 1.0 - p,
}
