"""The training layer moved from ``ray_metaopt.tune`` to ``ray_metaopt.training``: old imports still work."""

from __future__ import annotations

import importlib
import sys

import pytest

import ray_metaopt.training as training


@pytest.mark.parametrize("module", ["tasks", "builders"])
def test_old_module_paths_warn_and_give_the_same_objects(module):
    sys.modules.pop(f"ray_metaopt.tune.{module}", None)
    with pytest.warns(DeprecationWarning, match=f"ray_metaopt.tune.{module} moved to ray_metaopt.training.{module}"):
        old = importlib.import_module(f"ray_metaopt.tune.{module}")
    new = importlib.import_module(f"ray_metaopt.training.{module}")
    assert old.__all__ == new.__all__ and all(getattr(old, name) is getattr(new, name) for name in new.__all__)


def test_the_tune_package_re_exports_the_training_layer_without_warning(recwarn):
    import ray_metaopt.tune as tune_pkg

    for name in ("TrainingRun", "make_task", "register_task", "save_checkpoint", "load_checkpoint", "wrap_optimizer"):
        assert getattr(tune_pkg, name) is getattr(training, name)
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning) and "moved to" in str(w.message)]
