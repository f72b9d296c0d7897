"""A real multi-node Ray cluster on 127.0.0.1 for tests: ``ray start --head`` + ``ray start --address``.

Each node is its own ``ray start --block`` process in a new process group with its own
``--temp-dir`` (so ``ray.init()`` elsewhere never finds this cluster, and this cluster never
touches ``/tmp/ray``), small CPU counts, free ports for every listener (other Ray instances run on
the same machine), and a distinct custom resource (``node_head`` / ``node_worker1`` ...) so
tests can tell the nodes apart. Token authentication (on by default in Ray 2.60) is on, with a
fresh token passed to every node and driver through ``RAY_AUTH_TOKEN`` (never ``~/.ray``).

:meth:`LocalRayCluster.stop` ends exactly the processes this cluster started: each node and
driver is started with ``RAY_METAOPT_TEST_CLUSTER=<this cluster's temp dir>`` and
``RAY_METAOPT_TEST_NODE=<its name>`` in its environment, which every process it starts (GCS,
raylet, agents, Ray workers) inherits, so they are found through ``/proc/<pid>/environ`` whatever
process group or session they put themselves in, and never confused with another Ray (no pid
reuse either). It never runs ``ray stop``, which would end every Ray process on the machine
(other tests' too).

Example:
    >>> with LocalRayCluster() as cluster:
    ...     cluster.start_head(num_cpus=2)
    ...     cluster.add_worker(num_cpus=2)
    ...     cluster.run_driver("driver.py", "--out", "result.json")
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

READY_LINE = "Ray runtime started"
CLUSTER_MARKER = "RAY_METAOPT_TEST_CLUSTER"
NODE_MARKER = "RAY_METAOPT_TEST_NODE"

# Detect a dead node within ~3 s instead of Ray's default ~30 s (node-kill test).
FAST_FAILURE_DETECTION = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    name: str
    resource: str
    temp_dir: Path
    log: Path
    proc: subprocess.Popen

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class LocalRayCluster:
    """Start, inspect and stop a head and worker nodes on 127.0.0.1 (see module doc).

    Args:
        object_store_mb: object store size of each node, in MiB.
        env: extra environment variables for every node and driver.
    """

    def __init__(self, object_store_mb: int = 100, env: dict[str, str] | None = None) -> None:
        # Short base path: Ray's Unix sockets live under it (limit ~107 characters).
        self.base = Path(tempfile.mkdtemp(prefix="rmo", dir="/tmp"))
        self.token = secrets.token_hex(32)
        self.object_store_bytes = object_store_mb * 1024 * 1024
        self.gcs_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.nodes: list[Node] = []
        self._extra_env = dict(env or {})
        self._drivers: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ environment
    def env(self, name: str = "client") -> dict[str, str]:
        """Environment for the node or driver ``name`` of this cluster (token auth, no stray
        address, the markers that :meth:`stop` finds its processes by)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            RAY_DEDUP_LOGS="0",
            PYTHONUNBUFFERED="1",
        )
        env.update(FAST_FAILURE_DETECTION)
        env.update(self._extra_env)
        env[CLUSTER_MARKER] = str(self.base)
        env[NODE_MARKER] = name
        # Like an activated venv on every node: `python` in a job's entrypoint is this interpreter.
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        repo = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
        return env

    def _ray_cli(self) -> list[str]:
        return [sys.executable, "-m", "ray.scripts.scripts"]

    # ------------------------------------------------------------------ nodes
    def _start(self, name: str, args: list[str], num_cpus: int, timeout: float) -> Node:
        temp_dir = self.base / ("h" if name == "head" else name.replace("worker", "w"))  # short paths
        temp_dir.mkdir()
        resource = f"node_{name}"
        log = self.base / f"{name}.log"
        cmd = self._ray_cli() + [
            "start",
            "--block",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps({resource: 100})}",
            f"--object-store-memory={self.object_store_bytes}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            *args,
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, env=self.env(name), stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.base
            )
        node = Node(name, resource, temp_dir, log, proc)
        self.nodes.append(node)
        deadline = time.monotonic() + timeout
        while READY_LINE not in log.read_text(errors="replace"):
            if not node.alive:
                raise RuntimeError(f"ray start for {name} exited ({proc.returncode}):\n{self.tail(node)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not ready after {timeout}s:\n{self.tail(node)}")
            time.sleep(0.2)
        return node

    def start_head(self, num_cpus: int = 2, dashboard: bool = False, timeout: float = 60) -> Node:
        """Start the head node; with ``dashboard=True`` it serves the dashboard and the job API on
        ``self.dashboard_url`` (needs ``ray[default]``)."""
        self.dashboard_port = free_port()
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        return self._start(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                f"--include-dashboard={'true' if dashboard else 'false'}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",  # the minimal head binds it all the same
            ],
            num_cpus,
            timeout,
        )

    def add_worker(self, num_cpus: int = 2, timeout: float = 60) -> Node:
        index = sum(n.name.startswith("worker") for n in self.nodes) + 1
        return self._start(f"worker{index}", [f"--address={self.address}"], num_cpus, timeout)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def kill_node(self, name: str) -> None:
        """Kill a node abruptly (SIGKILL to every process it started), like a lost machine."""
        node = self.node(name)
        self._kill_marked(signal.SIGKILL, node=name, wait=10)
        node.proc.wait(timeout=10)

    # ------------------------------------------------------------------ drivers
    def start_driver(self, script: str | os.PathLike, *args: str, log: Path | None = None) -> subprocess.Popen:
        """Run ``python script --address <cluster> args...`` as a driver of this cluster."""
        name = f"driver{len(self._drivers)}"
        log = log or self.base / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(script), "--address", self.address, *args],
                env=self.env(name),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=Path(__file__).resolve().parents[2],
            )
        proc.log_path = log  # type: ignore[attr-defined]
        self._drivers.append(proc)
        return proc

    def ray_cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run the ``ray`` command (``ray job submit ...``) as a client of this cluster (its token in
        ``RAY_AUTH_TOKEN``, unless ``env`` replaces the environment)."""
        return subprocess.run(
            [*self._ray_cli(), *args],
            env=self.env("client") if env is None else env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.base,
        )

    def tail(self, node_or_path: Node | Path, lines: int = 40) -> str:
        path = node_or_path.log if isinstance(node_or_path, Node) else node_or_path
        try:
            text = Path(path).read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return f"(no {path})"
        return "\n".join(text[-lines:])

    def raylet_logs(self, lines: int = 30) -> str:
        """Tails of the raylet/GCS logs of every node (for failure messages)."""
        out = []
        for node in self.nodes:
            for pattern in ("raylet.out", "gcs_server.out"):
                for path in sorted(node.temp_dir.glob(f"session_*/logs/{pattern}")):
                    out.append(f"--- {node.name} {path.name}\n{self.tail(path, lines)}")
        return "\n".join(out)

    # ------------------------------------------------------------------ teardown
    def stop(self) -> None:
        """End every process this cluster started (SIGTERM, then SIGKILL); remove its temp dir."""
        self._kill_marked(signal.SIGTERM, wait=3)
        self._kill_marked(signal.SIGKILL, wait=10)
        for proc in self._drivers + [n.proc for n in self.nodes]:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.base, ignore_errors=True)

    def processes(self, node: str | None = None) -> list[int]:
        """Live processes of this cluster (of one node or driver when ``node`` is given)."""
        wanted = [f"{CLUSTER_MARKER}={self.base}".encode()]
        if node is not None:
            wanted.append(f"{NODE_MARKER}={node}".encode())
        me = os.getpid()
        found = []
        for pid in _pids():
            if pid == me:
                continue
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and all(w in environ for w in wanted):
                found.append(pid)
        return found

    def _kill_marked(self, sig: int, node: str | None = None, wait: float = 0.0) -> None:
        """Send ``sig`` to the cluster's (or one node's) processes until none is left or ``wait`` ends."""
        deadline = time.monotonic() + wait
        while True:
            pids = self.processes(node)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)
            if sig != signal.SIGKILL:  # one polite signal, then just wait
                while self.processes(node) and time.monotonic() < deadline:
                    time.sleep(0.1)
                return

    def __enter__(self) -> "LocalRayCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]
