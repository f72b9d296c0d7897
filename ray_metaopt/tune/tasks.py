"""Deprecated: moved to :mod:`ray_metaopt.training.tasks` (the Ray-free training layer); kept for one release."""

import warnings

from ..training.tasks import *  # noqa: F403
from ..training.tasks import __all__  # noqa: F401

warnings.warn(
    "ray_metaopt.tune.tasks moved to ray_metaopt.training.tasks; the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
