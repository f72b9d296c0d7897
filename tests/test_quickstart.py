"""examples/quickstart.py runs end to end (``--smoke``) in a fresh interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # Works from a checkout without `pip install -e .` too.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )


@pytest.mark.parametrize("strategy", ["plateau", "advanced"])
def test_quickstart_smoke(strategy):
    """Per-epoch decisions on the validation loss; the run is compared with the unwrapped AdamW."""
    proc = _run("--smoke", "--strategy", strategy)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    count = re.search(r"^DECISIONS=(\d+)$", proc.stdout, re.MULTILINE)
    assert count is not None, proc.stdout
    assert int(count.group(1)) >= 1
    # at least one plateau cut, printed with its reason
    assert re.search(r"decision @ step \d+: lr [\d.e-]+ -> [\d.e-]+ \(plateau", proc.stdout), proc.stdout
    assert "final val loss" in proc.stdout
    assert re.search(r"^lr by epoch: +0:[\d.e-]+ ", proc.stdout, re.MULTILINE), proc.stdout
    assert re.search(r"vs unwrapped AdamW .*wrapped / unwrapped = \d+\.\d{3}$", proc.stdout, re.MULTILINE), proc.stdout


def test_quickstart_per_step_is_the_seeds_usage():
    proc = _run("--smoke", "--per-step")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"PlateauMetaOptimizer\(patience=3, lr_factor=0\.5, .*monitor='loss'.*update_frequency=1\)", proc.stdout)
    assert re.search(r"wrapped / unwrapped = \d+\.\d{3}$", proc.stdout, re.MULTILINE), proc.stdout
