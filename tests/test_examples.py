"""Every example in examples/ runs with --smoke in its own process (starting its own local Ray)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))
COMMON_KEYS = {"num_trials", "num_errored", "best_val_loss"}

# Per example: the keys of its JSON line (None: it prints no JSON, only the exit code counts)
# and a check of the values.
EXPECTED = {
    "quickstart.py": (None, None),
    "shared_rl_policy.py": ({"num_trials", "trials_with_rollouts", "policy_updates", "policy_version"}, None),
    "tune_run.py": (
        COMMON_KEYS | {"per_strategy", "best_strategy"},
        lambda s: (
            s["num_trials"] == 6
            and set(s["per_strategy"]) == {"none", "cosine", "plateau", "advanced_plateau", "rl", "rl_pretrained"}
        ),
    ),
    "pbt_with_metaopt.py": (
        COMMON_KEYS | {"num_exploits", "wall_seconds"},
        lambda s: s["num_trials"] == 2 and s["num_exploits"] >= 1 and s["reuse_actors"] is True,
    ),
    "moe_expert_gate.py": (
        COMMON_KEYS | {"per_strategy"},
        lambda s: (
            s["num_trials"] == 3
            and all({"gate_lr", "expert_lr", "routing_entropy"} <= set(e) for e in s["per_strategy"].values())
        ),
    ),
    "custom_trainable.py": (COMMON_KEYS | {"num_decisions"}, lambda s: s["num_trials"] == 2),
}


def _run(name: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["HOME"] = str(tmp_path)  # Tune's default storage (~/ray_results) lands in the test's tmp dir
    env.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), "--smoke"],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_examples_are_all_known():
    # A new example is run by the test below either way; this asks that its output be checked too.
    assert set(EXAMPLES) <= set(EXPECTED), (
        f"add the new examples to EXPECTED: {set(EXAMPLES) - set(EXPECTED)}"
    )


@pytest.fixture(scope="module")
def example_runs(request, tmp_path_factory):
    """The selected examples' runs, two at a time: each spends much of its time starting its own
    Ray and waiting on it, so a pair on 2 cores takes little longer than one."""
    from concurrent.futures import ThreadPoolExecutor

    selected = [
        item.callspec.params["name"]
        for item in request.session.items
        if item.originalname == "test_example_smoke" and hasattr(item, "callspec")
    ]
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(_run, name, tmp_path_factory.mktemp(name.removesuffix(".py"))) for name in selected}
    yield futures
    pool.shutdown(wait=True)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_smoke(name, example_runs):
    proc = example_runs[name].result()
    tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-3000:]).strip()
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{tail}"
    keys, check = EXPECTED.get(name, (COMMON_KEYS, None))
    if keys is None:
        return
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    assert lines, f"{name} printed nothing:\n{tail}"
    summary = json.loads(lines[-1])
    assert keys <= set(summary), f"{name}: missing {keys - set(summary)} in {summary}"
    assert summary["num_trials"] >= 1
    if "num_errored" in summary:
        assert summary["num_errored"] == 0, summary
    if "best_val_loss" in summary:
        assert summary["best_val_loss"] is not None and math.isfinite(summary["best_val_loss"])
        assert summary["best_val_loss"] > 0
    if check is not None:
        assert check(summary), summary
