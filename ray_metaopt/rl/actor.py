"""One policy shared by every trial of an experiment: the :class:`PolicyActor` and its trial-side client.

Data flow::

    driver / Tune callback: start_policy_actor("policy", policy_config=cfg, checkpoint_uri=...)
    trial (RLMetaOptimizer(shared_policy="policy", **cfg))
        acts with a local copy of the weights            (no Ray call)
        client.send(transitions)  -> actor.submit.remote  (fire and forget)
        client.poll(version)      -> ray.wait(timeout=0) on actor.weights_if_newer.remote
    actor: buffers transitions from every trial, one REINFORCE update per ``batch_size``
        transitions with the population baseline, publishes version + 1, checkpoints.

Weights and transitions travel through actor calls (the object store), so trials on any node
reach the actor and nothing assumes a shared filesystem. Ray is imported only when these
functions run, so ``import ray_metaopt`` stays light.

Fault tolerance: with ``checkpoint_uri`` the actor writes its learner, counters and buffer every
``checkpoint_every`` updates (and on :meth:`PolicyActor.checkpoint`), and a Ray restart
(``max_restarts``) restores from it: a kill loses at most the transitions since the last
checkpoint, i.e. less than one aggregation interval with ``checkpoint_every=1``. On a cluster,
give a URI every node can reach (``s3://...``, ``gs://...``) or a path on shared storage: a local
path only survives restarts on the same node. Trials never fail because of the actor: calls that
fail are counted, the trial keeps its last weights and reconnects by name.

Lifetime: the actor is an ordinary (non-detached) actor owned by the process that started it, so
Ray ends it with that driver. A driver that is SIGKILLed can leave its Ray processes, this actor
included, running (measured: an orphan kept checkpointing, version 44 -> 59), so a checkpoint
directory has a single writer: every actor that starts on a ``checkpoint_uri`` writes a fresh
token to ``policy_actor.writer`` there, and an actor whose token is no longer the one in that
file writes no more checkpoints (``actor/checkpoints_refused`` counts them). A
``Tuner.restore`` that starts the actor again therefore owns the checkpoints from then on,
whatever an orphan of the killed driver still does.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from .._validation import check_int, check_optional_mapping, check_path, check_range
from .persistence import dumps, join, load_policy_for, loads, policy_state_from_learner, read_bytes, write_bytes
from .policy import PolicyConfig
from .reinforce import Learner, invalid_transition

logger = logging.getLogger(__name__)
CHECKPOINT_FILE = "policy_actor.pt"
WRITER_FILE = "policy_actor.writer"
_CHECKPOINT_FORMAT = "ray_metaopt.policy_actor"


def _check_name(arg: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{arg} must be a non-empty str, got {arg}={value!r}")
    return value


class PolicyActor:
    """Holds the shared policy and its learner; run it as a Ray actor with :func:`start_policy_actor`.

    It is a plain class (usable without Ray, e.g. in tests); :func:`start_policy_actor` wraps it
    with ``ray.remote``.

    Args:
        name: the actor's name (recorded in stats and checkpoints).
        policy_config: :class:`~ray_metaopt.rl.PolicyConfig` fields (the same dict the trials'
            ``RLMetaOptimizer`` gets).
        checkpoint_uri: directory (local path or pyarrow URI) to checkpoint to and restore from.
        checkpoint_every: checkpoint after every this many policy updates.
        max_staleness: ``None`` (default): learn from every valid transition, however old the
            policy that produced it, with its importance weight clipped at ``importance_clip``
            (as IMPALA does). An int: drop (and count) transitions more than that many versions
            old. The lag grows with the number of trials: a transition is sent once its return is
            known, ``return_horizon`` decisions after it acted, by a trial that refreshes its
            weights every ``sync_interval_s``, while every trial's transitions advance the
            version; ``benchmarks/RESULTS-staleness.md`` shows a bound of 16 dropping 61-87 % of
            the data and hurting learning at 64 trials, and no bound learning best at every
            trial count measured.
        importance_clip: upper clip of the importance weights.
        num_buckets: progress buckets of the population baseline.
        policy_path: start from a policy saved by :func:`~ray_metaopt.rl.save_policy` (when
            there is no checkpoint to restore).

    Example:
        >>> actor = PolicyActor("policy", {"policy_lr": 1e-3, "batch_size": 64})
        >>> actor.stats()["policy/version"]
        0
    """

    def __init__(
        self,
        name: str = "policy",
        policy_config: Mapping[str, Any] | None = None,
        *,
        checkpoint_uri: str | None = None,
        checkpoint_every: int = 1,
        max_staleness: int | None = None,
        importance_clip: float = 2.0,
        num_buckets: int = 10,
        policy_path: str | None = None,
    ) -> None:
        self.name = _check_name("name", name)
        self.config = PolicyConfig.from_dict(check_optional_mapping("policy_config", policy_config))
        self.checkpoint_uri = None if checkpoint_uri is None else check_path("checkpoint_uri", checkpoint_uri)
        if policy_path is not None:
            policy_path = check_path("policy_path", policy_path)
        self.checkpoint_every = check_int("checkpoint_every", checkpoint_every, minimum=1)
        self.max_staleness = (
            None if max_staleness is None else check_int("max_staleness", max_staleness, minimum=0)
        )
        self.learner = Learner(
            self.config, population_baseline=True, num_buckets=num_buckets, importance_clip=importance_clip
        )
        self.buffer: list[dict[str, Any]] = []
        self.counters: dict[str, Any] = {
            "transitions": 0,
            "per_trial": {},
            "segments": 0,
            "dropped_stale": 0,
            "dropped_invalid": 0,
            "lag_sum": 0,
            "lag_count": 0,
            "checkpoints": 0,
        }
        self.restored_version: int | None = None
        self.restores = 0
        self.checkpoints_refused = 0
        if not self._restore() and policy_path is not None:
            self._load_initial_policy(policy_path)
        self._writer_token: str | None = None
        if self.checkpoint_uri is not None:  # from now on this actor is the directory's only writer
            self._writer_token = uuid.uuid4().hex
            write_bytes(join(self.checkpoint_uri, WRITER_FILE), self._writer_token.encode())

    # ---------------------------------------------------------------- trials
    def weights_if_newer(self, version: int) -> dict[str, Any] | None:
        """The current weights when ``version`` differs from the actor's (else ``None``).

        ``version=-1`` always returns them (a trial's first contact, or after a reconnect).
        """
        if version == self.learner.version:
            return None
        return {
            "version": self.learner.version,
            "weights": self.learner.weights(),
            "signature": self.config.signature(),
        }

    def submit(self, transitions: Sequence[Mapping[str, Any]], source: str = "unknown") -> int:
        """Add a trial's finished transitions; learn when a batch is full. Returns the version.

        Invalid transitions (non-finite returns or features, wrong shapes) and transitions more
        than ``max_staleness`` versions old are dropped and counted, never raised: one bad trial
        must not stop the others' learning.
        """
        c = self.counters
        c["segments"] += 1
        source = str(source)
        if isinstance(transitions, (str, bytes)) or not isinstance(transitions, Sequence):
            c["dropped_invalid"] += 1  # a malformed segment counts once
            transitions = ()
        for t in transitions:
            if invalid_transition(t, self.config) is not None:
                c["dropped_invalid"] += 1
                continue
            lag = self.learner.version - int(t["version"])
            c["lag_sum"] += abs(lag)
            c["lag_count"] += 1
            if self.max_staleness is not None and lag > self.max_staleness:
                c["dropped_stale"] += 1
                continue
            c["transitions"] += 1
            c["per_trial"][source] = c["per_trial"].get(source, 0) + 1
            self.buffer.append(dict(t))
        batch = self.config.batch_size
        while len(self.buffer) >= batch:
            taken, self.buffer = self.buffer[:batch], self.buffer[batch:]
            self.learner.update(taken)
            if self.checkpoint_uri is not None and self.learner.updates % self.checkpoint_every == 0:
                self.checkpoint()
        return self.learner.version

    # ---------------------------------------------------------------- observability
    def stats(self) -> dict[str, Any]:
        """Updates, version, entropy, mean return, transitions (per trial), drops and version lag."""
        c = self.counters
        last = self.learner.last_metrics
        return {
            "policy/version": self.learner.version,
            "policy/updates": self.learner.updates,
            "policy/skipped_updates": self.learner.skipped_updates,
            "policy/entropy": last.get("policy/entropy", math.nan),
            "policy/mean_return": last.get("policy/mean_return", math.nan),
            "policy/pg_loss": last.get("policy/pg_loss", math.nan),
            "policy/baseline": last.get("policy/baseline", math.nan),
            "rollouts/transitions": c["transitions"],
            "rollouts/transitions_per_trial": dict(c["per_trial"]),
            "rollouts/segments": c["segments"],
            "rollouts/buffered": len(self.buffer),
            "rollouts/dropped_stale": c["dropped_stale"],
            "rollouts/dropped_invalid": c["dropped_invalid"],
            "rollouts/version_lag_mean": c["lag_sum"] / c["lag_count"] if c["lag_count"] else 0.0,
            "actor/checkpoints": c["checkpoints"],
            "actor/checkpoints_refused": self.checkpoints_refused,
            "actor/restores": self.restores,
            "actor/restored_version": self.restored_version,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": self.config.to_dict(),
            "version": self.learner.version,
            "checkpoint_uri": self.checkpoint_uri,
            "restored_version": self.restored_version,
        }

    def policy_state(self) -> dict[str, Any]:
        """The policy as :func:`~ray_metaopt.rl.save_policy` writes it (plain data and tensors)."""
        return policy_state_from_learner(self.learner, name=self.name)

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint_path(self) -> str | None:
        return None if self.checkpoint_uri is None else join(self.checkpoint_uri, CHECKPOINT_FILE)

    def checkpoint(self) -> str | None:
        """Write the learner, counters and buffer to ``checkpoint_uri`` now. Returns the file's path
        (``None`` without a ``checkpoint_uri``, or when a newer actor owns the directory)."""
        path = self._checkpoint_path()
        if path is None:
            return None
        owner = read_bytes(join(self.checkpoint_uri, WRITER_FILE))
        if owner is not None and owner.decode(errors="replace") != self._writer_token:
            if not self.checkpoints_refused:
                logger.warning(
                    "policy actor %r: another actor has started on %s; this one writes no more checkpoints",
                    self.name,
                    self.checkpoint_uri,
                )
            self.checkpoints_refused += 1
            return None
        self.counters["checkpoints"] += 1
        state = {
            "format": _CHECKPOINT_FORMAT,
            "name": self.name,
            "config": self.config.to_dict(),
            "learner": self.learner.state_dict(),
            "counters": self.counters,
            "buffer": self.buffer,
        }
        write_bytes(path, dumps(state))
        return path

    def _restore(self) -> bool:
        path = self._checkpoint_path()
        data = None if path is None else read_bytes(path)
        if data is None:
            return False
        state = loads(data)
        if state.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a PolicyActor checkpoint")
        self.config.require_compatible(
            PolicyConfig.from_dict(state["config"]),
            f"checkpoint {path} was written by a policy with",
            "use another checkpoint_uri or the same policy_config",
        )
        self.learner.load_state_dict(state["learner"])
        self.counters = dict(state["counters"])
        self.buffer = list(state["buffer"])
        self.restored_version = self.learner.version
        self.restores = 1
        return True

    def _load_initial_policy(self, path: str) -> None:
        self.learner.load_state_dict(load_policy_for(self.config, path, "pass the same policy_config"))


# -------------------------------------------------------------------- driver side
def start_policy_actor(
    name: str = "policy",
    *,
    namespace: str = "ray_metaopt",
    policy_config: Mapping[str, Any] | None = None,
    checkpoint_uri: str | None = None,
    max_restarts: int = -1,
    checkpoint_every: int = 1,
    max_staleness: int | None = None,
    importance_clip: float = 2.0,
    num_buckets: int = 10,
    policy_path: str | None = None,
    num_cpus: float = 0.0,
    actor_options: Mapping[str, Any] | None = None,
) -> Any:
    """Start the shared policy actor, or return the running one of that name (idempotent).

    Call it from the driver (or a Tune callback's ``setup``) before the trials start, never inside
    a trial: Tune would place the actor in that trial's placement group and kill it with the
    trial. The actor takes ``num_cpus=0`` by default so it never holds back trial scheduling.
    Blocks until the actor is up (and restored from its checkpoint, if any).

    Args:
        name: the actor's name; trials pass it as ``RLMetaOptimizer(shared_policy=name)``.
        namespace: Ray namespace of the name (trials pass ``policy_namespace``).
        policy_config: :class:`~ray_metaopt.rl.PolicyConfig` fields, the same as the trials'.
        checkpoint_uri: where the actor checkpoints (see module doc). ``None``: no checkpoints,
            so a restarted actor starts from scratch.
        max_restarts: Ray restarts of the actor after it dies (-1: unlimited).
        checkpoint_every, max_staleness, importance_clip, num_buckets, policy_path: see
            :class:`PolicyActor`.
        num_cpus: CPUs the actor reserves.
        actor_options: more ``ray.remote`` options (``lifetime``, ``scheduling_strategy``...).

    Returns:
        The actor's handle.

    Example:
        >>> ray.init()
        >>> actor = start_policy_actor("policy", policy_config={"policy_lr": 1e-3},
        ...                            checkpoint_uri="/tmp/policy_ckpt")
        >>> ray.get(actor.stats.remote())["policy/version"]
        0
    """
    import ray

    _check_name("name", name)
    _check_name("namespace", namespace)
    config = PolicyConfig.from_dict(policy_config)
    check_int("max_restarts", max_restarts, minimum=-1)
    check_range("num_cpus", num_cpus, 0.0, math.inf, high_open=True)
    if not ray.is_initialized():
        raise RuntimeError("start_policy_actor needs Ray: call ray.init() (or run it in a Tune driver) first")
    options = {
        "name": name,
        "namespace": namespace,
        "get_if_exists": True,
        "num_cpus": num_cpus,
        "max_restarts": max_restarts,
        "max_task_retries": 0,  # a call that fails is dropped and counted by the trial, not replayed
        "max_concurrency": 1,
        **dict(actor_options or {}),
    }
    handle = (
        ray.remote(PolicyActor)
        .options(**options)
        .remote(
            name,
            config.to_dict(),
            checkpoint_uri=checkpoint_uri,
            checkpoint_every=checkpoint_every,
            max_staleness=max_staleness,
            importance_clip=importance_clip,
            num_buckets=num_buckets,
            policy_path=policy_path,
        )
    )
    info = ray.get(handle.describe.remote())
    if info["config"] != config.to_dict():
        raise ValueError(
            f"a policy actor named {name!r} already runs in namespace {namespace!r} with policy_config "
            f"{info['config']}, not {config.to_dict()}"
        )
    return handle


def get_policy_actor(name: str = "policy", *, namespace: str = "ray_metaopt") -> Any:
    """The handle of a running policy actor. Raises ``ValueError`` when there is none."""
    import ray

    try:
        return ray.get_actor(_check_name("name", name), namespace=_check_name("namespace", namespace))
    except ValueError as e:
        raise ValueError(
            f"no policy actor named {name!r} in namespace {namespace!r}; start it with start_policy_actor"
        ) from e


# -------------------------------------------------------------------- trial side
def _source_id() -> str:
    """Who sends the transitions: the Tune trial id when in a trial, else host and pid."""
    import sys

    tune = sys.modules.get("ray.tune")
    if tune is not None:
        with contextlib.suppress(Exception):  # outside a Tune session there is no trial id
            trial_id = tune.get_context().get_trial_id()
            if trial_id:
                return str(trial_id)
    return f"{socket.gethostname()}:{os.getpid()}"


class PolicyClient:
    """The trial's side of the shared policy: never blocks the training step.

    ``send`` is fire-and-forget; ``poll`` checks with ``ray.wait(timeout=0)`` whether the one
    outstanding weights request has come back, at most every ``sync_interval_s`` seconds (in
    between it is one clock read: a trial deciding every few milliseconds makes no Ray call per
    decision). When the actor is unreachable (not started yet, dead, restarting) the client keeps
    up to ``max_outbox`` segments, drops older ones (counted) and retries the connection by name
    every ``reconnect_interval_s`` seconds. A segment whose send failed because the actor died
    goes back into the outbox and is delivered to the restarted (or newly started) actor.

    One call at a time: while a send is unacknowledged, new transitions wait in a local batch that
    goes out as one call when the earlier one has landed (seen at the next ``poll``) or when it
    holds ``max_batch`` transitions. A trial that produces faster than the actor answers (or many
    trials against one actor) then makes fewer, larger calls instead of queueing small ones; on a
    quiet actor a segment waits at most one ``sync_interval_s``.

    Args:
        name: the actor's name.
        namespace: its Ray namespace.
        sync_interval_s: seconds between two checks for new weights (and for failed sends).
        reconnect_interval_s: seconds between connection attempts.
        max_outbox: segments kept while disconnected (failed sends included).
        max_batch: transitions a waiting batch may hold before it is sent without waiting for the
            previous call (>= 1).
        source: id reported with the transitions (default: Tune trial id, else host:pid).
    """

    def __init__(
        self,
        name: str,
        namespace: str = "ray_metaopt",
        *,
        sync_interval_s: float = 0.5,
        reconnect_interval_s: float = 5.0,
        max_outbox: int = 32,
        max_batch: int = 256,
        source: str | None = None,
    ) -> None:
        self.name = _check_name("name", name)
        self.namespace = _check_name("namespace", namespace)
        self.sync_interval_s = check_range("sync_interval_s", sync_interval_s, 0.0, math.inf, high_open=True)
        self.reconnect_interval_s = check_range(
            "reconnect_interval_s", reconnect_interval_s, 0.0, math.inf, high_open=True
        )
        self.max_outbox = check_int("max_outbox", max_outbox, minimum=1)
        self.max_batch = check_int("max_batch", max_batch, minimum=1)
        self.source = source or _source_id()
        self._handle: Any = None
        self._next_connect = 0.0
        self._next_sync = 0.0
        self._weights_ref: Any = None
        self._synced = False  # got an answer from the current connection
        # (ref, transitions, connection number): a failed send of an older connection must not
        # drop the current one.
        self._inflight: list[tuple[Any, list[dict[str, Any]], int]] = []
        self._outbox: list[list[dict[str, Any]]] = []
        self._batch: list[dict[str, Any]] = []  # connected, waiting for the call in flight
        self._warned: set[str] = set()
        self.counters = {
            "connects": 0,
            "actor_errors": 0,
            "segments_sent": 0,
            "segments_dropped": 0,
            "segments_requeued": 0,
            "weight_updates": 0,
        }

    def _ray(self) -> Any:
        import ray

        return ray if ray.is_initialized() else None

    def _connect(self) -> bool:
        if self._handle is not None:
            return True
        ray = self._ray()
        now = time.monotonic()
        if ray is None:
            self._warn_once("no-ray", "Ray is not initialized")
            return False
        if now < self._next_connect:
            return False
        self._next_connect = now + self.reconnect_interval_s
        try:
            self._handle = ray.get_actor(self.name, namespace=self.namespace)
        except ValueError:
            self._warn_once("missing", f"no actor named {self.name!r} in namespace {self.namespace!r}")
            return False
        self.counters["connects"] += 1
        self._synced = False
        self._flush_outbox()
        return True

    def _flush_outbox(self) -> None:
        """Send what waited in the outbox over the current connection."""
        outbox, self._outbox = self._outbox, []
        for transitions in outbox:
            self._submit(transitions)

    def _keep(self, transitions: list[dict[str, Any]]) -> None:
        """Put a segment in the bounded outbox (the oldest one is dropped, and counted, when full)."""
        self._outbox.append(transitions)
        if len(self._outbox) > self.max_outbox:
            self._outbox.pop(0)
            self.counters["segments_dropped"] += 1

    def _warn_once(self, key: str, why: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(
                "shared policy %r unreachable (%s): acting with the current weights, keeping up to %d "
                "segments and retrying every %.3g s",
                self.name,
                why,
                self.max_outbox,
                self.reconnect_interval_s,
            )

    def _lost(self) -> None:
        if self._batch:  # never sent: it goes to the next actor like a failed send
            self._keep(self._batch)
            self._batch = []
        self.counters["actor_errors"] += 1
        self._handle = None
        self._weights_ref = None
        self._synced = False
        self._next_connect = time.monotonic() + self.reconnect_interval_s

    def _submit(self, transitions: list[dict[str, Any]]) -> None:
        ref = self._handle.submit.remote(transitions, self.source)
        self._inflight.append((ref, transitions, self.counters["connects"]))
        self.counters["segments_sent"] += 1

    def _check_inflight(self, timeout: float = 0.0) -> None:
        if self._inflight:
            self._collect_acks(timeout)
        if self._handle is not None:  # sends of a dead connection go over the live one
            self._flush_outbox()
            if self._batch and not self._inflight:
                self._send_batch()

    def _collect_acks(self, timeout: float) -> None:
        import ray

        segments = {entry[0]: entry for entry in self._inflight}
        ready, waiting = ray.wait(list(segments), num_returns=len(segments), timeout=timeout)
        self._inflight = [segments[ref] for ref in waiting]
        for ref in ready:
            _, transitions, connection = segments[ref]
            try:
                ray.get(ref)  # ready: returns at once
            except ray.exceptions.RayActorError:
                # The actor died before taking the segment: keep it for the next actor.
                if self._handle is not None and connection == self.counters["connects"]:
                    self._lost()
                self._keep(transitions)
                self.counters["segments_requeued"] += 1
            except ray.exceptions.RayError:
                self.counters["actor_errors"] += 1  # the actor raised on it: resending would too

    def _send_batch(self) -> None:
        batch, self._batch = self._batch, []
        self._submit(batch)

    def send(self, transitions: list[dict[str, Any]]) -> None:
        """Hand finished transitions to the actor without waiting (batched while a call is in flight)."""
        if not self._connect():
            self._keep(transitions)
            return
        self._batch.extend(transitions)
        if not self._inflight or len(self._batch) >= self.max_batch:
            self._send_batch()

    def poll(self, known_version: int) -> dict[str, Any] | None:
        """New weights (``{"version", "weights", "signature"}``) if they have arrived, else ``None``."""
        now = time.monotonic()
        if now < self._next_sync or not self._connect():
            return None
        self._next_sync = now + self.sync_interval_s
        import ray

        self._check_inflight()
        if self._handle is None:
            return None
        result = None
        if self._weights_ref is not None:
            ready, _ = ray.wait([self._weights_ref], timeout=0)
            if not ready:
                return None
            ref, self._weights_ref = self._weights_ref, None
            try:
                result = ray.get(ref)  # ready: returns at once
            except ray.exceptions.RayError:
                self._lost()
                return None
            self._synced = True
            if result is not None:
                self.counters["weight_updates"] += 1
                known_version = int(result["version"])
        # Ask again now, so that the next check finds the answer waiting.
        self._weights_ref = self._handle.weights_if_newer.remote(known_version if self._synced else -1)
        return result

    def drain(self, timeout_s: float = 5.0) -> None:
        """Wait up to ``timeout_s`` for sent segments to land (end of training only: it blocks)."""
        deadline = time.monotonic() + timeout_s
        while (self._outbox or self._inflight or self._batch) and time.monotonic() < deadline:
            if self._outbox:
                self._next_connect = 0.0  # retry now: the run is over, waiting is allowed
                if not self._connect():
                    time.sleep(0.2)
                    continue
            # Failed sends come back to the outbox and go round again while time is left.
            self._check_inflight(timeout=min(1.0, max(0.0, deadline - time.monotonic())))

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "connected": self._handle is not None,
            "inflight": len(self._inflight),
            "outbox": len(self._outbox),
            "batched": len(self._batch),
        }
