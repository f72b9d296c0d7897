"""benchmarks/staleness.py runs (smoke size) and measures what it says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_staleness_benchmark_smoke():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "staleness.py"), "--seeds", "1", "--transitions", "512",
         "--trials", "16", "--delay", "40"],
        capture_output=True, text=True, timeout=300, env=env, check=True,
    ).stdout
    rows = json.loads(out.strip().splitlines()[-1])["rows"]
    by_bound = {r["max_staleness"]: r for r in rows}
    assert set(by_bound) == {16, None}
    assert by_bound[None]["dropped"] == 0.0
    assert by_bound[16]["dropped"] > 0.3  # a 40-round delay at 16 trials: tens of versions of lag
    assert "| 16 | none |" in out
