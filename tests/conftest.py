"""Shared fixtures. Tests that need Ray use ``ray_session``: one real local Ray for the whole run."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

# Tests run beside Ray workers on small (2-core) machines: intra-op threads only add contention.
torch.set_num_threads(1)

# Every Ray this test run starts (the session fixture, example and cluster subprocesses) keeps its
# sessions, sockets and "current cluster" file in a fresh, short directory of its own: nothing left
# in /tmp/ray by an earlier run can interfere, and a long TMPDIR cannot push the AF_UNIX socket
# paths past their length limit.
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rmo-", dir="/tmp" if os.path.isdir("/tmp") else None))

# Keep Ray quiet and light in tests (2-core CI machines).
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray (4 logical CPUs; the real GPUs, or 2 simulated ones) shared by every test.

    Tests that start their own cluster (``cluster`` marker) run their Ray client in a subprocess
    so they never conflict with this one.
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never attach to a cluster another test or process started
            num_cpus=4,
            num_gpus=torch.cuda.device_count() or 2,  # simulated GPUs where there is no CUDA (2: each is a trial start-up in the placement test)
            include_dashboard=False,
            namespace="ray_metaopt_tests",
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


def pytest_sessionfinish(session, exitstatus):
    if os.path.basename(os.environ.get("RAY_TMPDIR", "")).startswith("rmo-"):
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
