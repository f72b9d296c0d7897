"""docker/cluster.yaml, docker-compose.yml and the Dockerfile cannot drift from Ray or the README.

The cluster YAML is validated against the JSON schema that ships with the installed Ray
(``ray/autoscaler/ray-schema.json``, what ``ray up`` validates against) with ``jsonschema``:
Ray has no public validation function (``ray.autoscaler._private.util.validate_config`` is
private), and the schema file is the contract that function applies.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")  # PyYAML is a dependency of ray[tune]
jsonschema = pytest.importorskip("jsonschema")  # so is jsonschema (Ray's autoscaler schema)

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
# The README's set-up command, as the lead engineer fixed it; the images and cluster run it with
# their own Python instead of a fresh venv.
README_INSTALL = 'pip install torch==2.13.0 -e ".[test]"'


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _cluster() -> dict:
    return yaml.safe_load((DOCKER / "cluster.yaml").read_text())


def test_cluster_yaml_matches_rays_schema():
    jsonschema.validate(_cluster(), _ray_schema())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.pop("cluster_name"), "'cluster_name' is a required property"),
        (lambda c: c["docker"].update(gpus=True), "Additional properties are not allowed"),
        (lambda c: c["available_node_types"]["worker.gpu"]["resources"].update(GPU=0.5), "is not of type 'integer'"),
    ],
)
def test_schema_check_catches_drift(mutate, message):
    # The validation above is not vacuous: the same schema rejects plausible mistakes.
    config = _cluster()
    mutate(config)
    with pytest.raises(jsonschema.ValidationError, match=message):
        jsonschema.validate(config, _ray_schema())


def test_cluster_yaml_semantics():
    import ray

    c = _cluster()
    types = c["available_node_types"]
    assert c["head_node_type"] in types  # ray up requires it (checked outside the schema)
    assert sum(t.get("max_workers", 0) for t in types.values()) <= c["max_workers"]
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "a GPU worker node type"
    assert types[c["head_node_type"]]["resources"].get("GPU", 0) == 0
    # images pin the installed Ray version (the driver and the cluster must run the same Ray)
    for key in ("head_image", "worker_image"):
        assert c["docker"][key].startswith(f"rayproject/ray:{ray.__version__}-py3"), c["docker"][key]
    assert c["docker"]["worker_image"].endswith("-gpu")
    # token authentication on every node, and the README's install command
    setup = "\n".join(c["setup_commands"])
    assert "~/.ray/auth_token" in setup and "RAY_AUTH_MODE=token" in setup
    assert README_INSTALL in setup
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token ray start" in cmd for cmd in c[key]), key
    assert "~/.ray-token" in c["file_mounts"]


def test_start_commands_parse_with_ray_cli():
    """Every `ray start` flag used in cluster.yaml and docker-compose.yml exists in this Ray."""
    from click.testing import CliRunner
    from ray.scripts.scripts import cli

    help_text = CliRunner().invoke(cli, ["start", "--help"], terminal_width=200).output
    known = set(re.findall(r"(--[a-z][a-z0-9-]*)", help_text))
    c = _cluster()
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    commands = c["head_start_ray_commands"] + c["worker_start_ray_commands"]
    commands += [s["command"] for s in compose["services"].values()]
    used = set()
    for command in commands:
        for part in re.split(r"[;&|]", command):
            words = shlex.split(part.replace('bash -c "', "").rstrip('"'), posix=True)
            if "start" in words and "ray" in words:
                used |= {w.split("=", 1)[0] for w in words if w.startswith("--")}
    assert used, "no ray start commands found"
    assert used <= known, sorted(used - known)


def test_compose_file():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"head", "worker"}
    for name, service in services.items():
        env = service["environment"]
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name  # no token in the file
        assert "shared:/shared" in service["volumes"]
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert "--head" in services["head"]["command"]
    assert "--address=ray-head:6379" in services["worker"]["command"]
    assert services["worker"]["deploy"]["replicas"] == 2


def test_dockerfile_installs_like_the_readme():
    text = (DOCKER / "Dockerfile").read_text()
    run = re.search(r"python -m pip install (.+?)\\?\n", text).group(1)
    assert run.strip().rstrip("\\").strip() == '"torch==${TORCH_VERSION}" -e ".[${EXTRAS}]"'
    assert "ARG TORCH_VERSION=2.13.0" in text and "ARG EXTRAS=test" in text
    assert re.search(r"^ARG RAY_IMAGE=rayproject/ray:[0-9.]+-py311-cpu$", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0", "0:0")  # runs as a non-root user
    readme = REPO / "README.md"
    if readme.exists():  # keep the README and the images on one command
        assert README_INSTALL in readme.read_text()
