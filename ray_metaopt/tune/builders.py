"""Deprecated: moved to :mod:`ray_metaopt.training.builders` (the Ray-free training layer); kept for one release."""

import warnings

from ..training.builders import *  # noqa: F403
from ..training.builders import __all__  # noqa: F401

warnings.warn(
    "ray_metaopt.tune.builders moved to ray_metaopt.training.builders; the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
