"""The cluster guide's submission path, followed on a real two-node cluster on 127.0.0.1.

``docker/README.md`` tells users to submit the shared-policy example through the dashboard's job
API: ``ray job submit --address http://<head>:8265 -- bash -c "cd <repo> && python
examples/shared_rl_policy.py --address auto ..."`` with the cluster's token. This test runs that
command, and the guide's ``ray-metaopt --address auto`` comparison, against a head (dashboard on)
and a worker started with ``ray start``, token authentication on; then checks the job with
``ray job list`` / ``ray job logs``, and that a job client and a ``ray-metaopt --address host:port``
driver without the token are refused (the CLI saying how to connect). The job API
needs ``ray[default]`` (the ``cluster`` extra, part of ``test``).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from local_cluster import LocalRayCluster

REPO = Path(__file__).resolve().parents[2]
TRIALS, STEPS = 4, 150


def _last_json_line(text: str) -> dict:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    raise AssertionError(f"no JSON summary line in:\n{text[-3000:]}")


@pytest.mark.cluster
@pytest.mark.slow
def test_guide_job_submission_on_two_nodes(tmp_path):
    if importlib.util.find_spec("aiohttp") is None:
        pytest.fail("the job API needs ray[default]: install the package with the README's set-up (.[test])")
    storage = tmp_path / "shared"
    entrypoint = (
        f"cd {REPO} && python examples/shared_rl_policy.py --address auto "
        f"--trials {TRIALS} --steps {STEPS} --storage {storage}"
    )
    with LocalRayCluster() as cluster:
        # One CPU per node and one-CPU trials: running two at a time needs both nodes.
        cluster.start_head(num_cpus=1, dashboard=True, timeout=120)
        cluster.add_worker(num_cpus=1)
        url = cluster.dashboard_url

        submitted = cluster.ray_cli("job", "submit", "--address", url, "--", "bash", "-c", entrypoint)
        output = submitted.stdout + submitted.stderr
        failure = f"{output[-6000:]}\n--- head\n{cluster.tail(cluster.node('head'))}"
        assert submitted.returncode == 0, failure
        match = re.search(r"Job '(raysubmit_\w+)' succeeded", output)
        assert match, failure
        job_id = match.group(1)

        summary = _last_json_line(submitted.stdout)
        assert summary["num_trials"] == TRIALS and summary["num_errored"] == 0, summary
        assert summary["trials_with_rollouts"] == TRIALS, summary  # every trial fed the one actor
        assert summary["policy_updates"] >= 1 and summary["policy_version"] == summary["policy_updates"]
        assert Path(summary["saved_policy"]).is_file()
        assert sum(summary["trials_per_node"].values()) == TRIALS and "unknown" not in summary["trials_per_node"]
        assert (storage / "shared_rl_policy").is_dir()  # Tune wrote results to the storage path

        listed = cluster.ray_cli("job", "list", "--address", url)
        assert listed.returncode == 0, listed.stderr[-3000:]
        assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout, listed.stdout[-3000:]

        logs = cluster.ray_cli("job", "logs", "--address", url, job_id)
        assert logs.returncode == 0 and '"trials_with_rollouts"' in logs.stdout, logs.stderr[-3000:]

        # The guide's other command: the strategy comparison, submitted the same way.
        output_dir = tmp_path / "comparison"
        cli = cluster.ray_cli(
            "job", "submit", "--address", url, "--", "bash", "-c",
            f"cd {REPO} && ray-metaopt --address auto --smoke --strategies none plateau rl --no-plot "
            f"--storage-path {storage} --output {output_dir}",
        )
        assert cli.returncode == 0, (cli.stdout + cli.stderr)[-6000:]
        results = json.loads((output_dir / "results.json").read_text())
        rows = results["trials"]
        assert sorted(r["strategy"] for r in rows) == ["none", "plateau", "rl"]
        assert all(r["error"] is None and r["status"] == "done" for r in rows), rows
        assert results["policy_stats"]["rollouts/transitions"] > 0  # the rl trial fed the cluster's actor

        # A driver outside the cluster without its token: the CLI says how to connect instead of
        # Ray's bare ConnectionError (`--address host:port`, the other way the guide connects).
        anonymous = {k: v for k, v in cluster.env("anonymous").items() if not k.startswith("RAY_AUTH")}
        anonymous["HOME"] = str(tmp_path / "home")
        refused = subprocess.run(
            [sys.executable, "-c", "import sys; from ray_metaopt.cli import main; sys.exit(main(sys.argv[1:]))",
             "--address", cluster.address, "--smoke", "--no-plot"],
            env=anonymous, capture_output=True, text=True, timeout=180,
        )
        assert refused.returncode != 0
        assert f"the Ray cluster at {cluster.address} refused this driver" in refused.stderr, refused.stderr[-3000:]
        assert "RAY_AUTH_MODE=token" in refused.stderr

        # A job client without the cluster's token (none in the environment, none in ~/.ray) is refused.
        anonymous = {k: v for k, v in cluster.env("anonymous").items() if k != "RAY_AUTH_TOKEN"}
        anonymous["HOME"] = str(tmp_path / "home")
        refused = cluster.ray_cli("job", "list", "--address", url, env=anonymous)
        assert refused.returncode != 0
        assert "authentication" in (refused.stdout + refused.stderr).lower(), refused.stderr[-3000:]
    assert cluster.processes() == []  # the job's driver and trials ended with the cluster
