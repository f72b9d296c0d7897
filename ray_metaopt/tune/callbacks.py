"""A Tune callback that owns the experiment-level pieces of meta-optimization.

:class:`MetaOptCallback` runs on the Tune driver and

- creates the shared RL policy actor in ``setup()`` (before any trial starts, outside every
  trial's placement group, so it outlives trials and their restarts);
- records each trial's hyperparameter trajectory (step, lr and weight decay per param group,
  losses, the meta-optimizer's decisions) and writes it as JSON and CSV into the trial's
  directory (synced to the experiment's ``storage_path`` by Tune, like ``result.json``) and,
  when asked, into a directory of your choice;
- polls the policy actor's ``stats`` without stalling the Tune loop (a fire-and-forget request
  whose reply is picked up with ``ray.wait(timeout=0)`` on a later loop step), logs them and
  keeps the latest in :attr:`MetaOptCallback.policy_stats`;
- saves the policy with ``save_policy`` at the end of the experiment.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable

import ray
from ray.tune import Callback

from .._validation import check_path, check_range

if TYPE_CHECKING:  # pragma: no cover
    from ray.tune.experiment import Trial

logger = logging.getLogger(__name__)

TRAJECTORY_JSON = "metaopt_trajectory.json"
TRAJECTORY_CSV = "metaopt_trajectory.csv"
DECISIONS_CSV = "metaopt_decisions.csv"

# Scalar result keys copied into every trajectory record (when the trial reports them).
_RECORD_KEYS = (
    "step",
    "training_iteration",
    "train_loss",
    "val_loss",
    "best_val_loss",
    "reference_train_loss",  # with paired_reference: the base schedule at the same seed
    "reference_val_loss",
    "lr",
    "meta/num_decisions",
    "meta/num_skipped",
    "diverged",
    "lr_at_floor",
    "steps_per_second",
    "time_total_s",
)
_RECORD_PREFIXES = ("lr/", "weight_decay/")
# Prefix of the shared policy actor's stats added to the results of the trials that use it
# ("shared/policy/version"...), distinct from the trial's own RL metrics ("policy/...").
SHARED_STATS_PREFIX = "shared/"
_DECISION_FIELDS = ("step", "group", "name", "hparam", "old", "new", "reason")


def _flatten(result: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def _plain_scalar(value: Any) -> Any:
    """Python bool/int/float/str for JSON; numpy scalars and 0-dim tensors are unwrapped."""
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value
    if hasattr(value, "item"):
        try:
            return value.item()
        except (TypeError, ValueError):
            return None
    return None


def _map_leaves(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """``value`` as JSON's shapes (mappings -> dicts with str keys, tuples -> lists) with ``leaf``
    applied to everything else."""
    if isinstance(value, Mapping):
        return {str(k): _map_leaves(v, leaf) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_leaves(v, leaf) for v in value]
    return leaf(value)


def _json_safe(value: Any) -> Any:
    """NaN/inf become strings so the JSON files stay standard JSON (:func:`read_trajectory` undoes it)."""
    return _map_leaves(value, lambda x: str(x) if isinstance(x, float) and not math.isfinite(x) else x)


def _plain(value: Any) -> Any:
    """Plain-data copy of a config value (anything else becomes its ``repr``)."""

    def leaf(x: Any) -> Any:
        scalar = _plain_scalar(x)
        return scalar if scalar is not None or x is None else repr(x)

    return _map_leaves(value, leaf)


def _trial_summary_config(config: Mapping[str, Any]) -> dict[str, Any]:
    keys = (
        "task",
        "task_config",
        "optimizer",
        "optimizer_config",
        "meta",
        "meta_config",
        "schedule",
        "seed",
        "max_steps",
        "eval_interval",
    )
    summary = {k: _plain(config[k]) for k in keys if k in config}
    # A label for plots and tables: the CLI's "_strategy", else the strategy name.
    label = config.get("_strategy", config.get("strategy"))
    if label is not None:
        summary["strategy"] = _plain(label)
    return summary


def _rewind(trajectory: dict[str, Any], step: Any) -> None:
    """Drop what a restored trial is about to report again.

    A trial that resumes from a checkpoint (failure retry, ``Tuner.restore``, a PBT exploit)
    re-runs the steps after it, so a report can come with a step at or before the last recorded
    one: the records from that step on, and the decisions made after the last record kept
    (decision steps are 0-based, so a record at step ``S`` covers decisions up to ``S - 1``), are
    replaced by the new ones.
    """
    records = trajectory["records"]
    if (
        not isinstance(step, (int, float))
        or not records
        or not isinstance(records[-1].get("step"), (int, float))
    ):
        return
    if step > records[-1]["step"]:
        return
    records[:] = [r for r in records if not isinstance(r.get("step"), (int, float)) or r["step"] < step]
    kept_until = records[-1]["step"] if records and isinstance(records[-1].get("step"), (int, float)) else 0
    trajectory["decisions"][:] = [
        d
        for d in trajectory["decisions"]
        if not isinstance(d.get("step"), (int, float)) or d["step"] < kept_until
    ]


class MetaOptCallback(Callback):
    """Experiment-level owner of the shared RL policy and of the hyperparameter trajectories.

    Args:
        policy_name: name of the shared policy actor to create at experiment start (trials use
            it with ``meta="rl", meta_config={"shared_policy": policy_name}``). ``None``: no actor.
        policy_config: the policy's arguments (``lr_actions``, ``wd_actions``, ``policy_lr``,
            ``entropy_weight``, ...), passed to ``start_policy_actor``.
        policy_namespace: Ray namespace of the actor (must match the trials'
            ``policy_namespace``, ``"ray_metaopt"`` by default).
        policy_checkpoint_uri: where the actor checkpoints itself and restores from on restart.
        policy_save_path: file the final policy is written to with ``save_policy`` in
            ``on_experiment_end`` (``None``: not saved).
        max_restarts: the actor's ``max_restarts`` (``-1``: restart forever).
        stats_interval_s: seconds between two ``stats`` requests to the actor.
        stats_timeout_s: longest wait for the final ``stats``/``policy_state`` at the end.
        trajectory_dir: also write every trial's trajectory into this local directory as
            ``<trial_id>.json`` / ``<trial_id>.csv`` (``None``: only into the trial directories).
        write_interval_s: rewrite a running trial's files at most this often (they are always
            written when the trial ends).
        add_policy_stats_to_results: add the actor's latest scalar stats, prefixed ``shared/``
            (``shared/policy/version``...), to the results of the trials that use this policy
            (``meta_config["shared_policy"] == policy_name``), so they show in ``result.json``,
            TensorBoard and the ``ResultGrid``.

    Attributes:
        trajectories: ``trial_id -> {"trial_id", "config", "status", "records": [...],
            "decisions": [...], "reported_steps", "diverged", "error", "finished"}``: plain data,
            as written to the JSON files. ``records``/``decisions`` are the trial's effective
            history (what a restore re-ran replaces what it had reported); ``reported_steps`` is
            the step of every report in arrival order, restores included (with
            ``ray_metaopt.bench.stats.executed_steps``: the steps really trained);
            ``diverged`` whether any report said so; ``error`` the trial's error message;
            ``finished`` the position in which it ended in this experiment (``None`` while
            running).
        policy_stats: the latest stats from the policy actor (``None`` before the first reply).
        policy_stats_history: ``[(unix_time, stats), ...]`` of every reply received.
        policy_actor: the actor handle (``None`` without ``policy_name``).
        saved_policy_path: where ``on_experiment_end`` saved the policy, or ``None``.

    Example:
        >>> callback = MetaOptCallback(policy_name="shared_policy",
        ...                            policy_config={"lr_actions": [0.5, 1.0, 2.0]},
        ...                            policy_save_path="/tmp/policy.pt")
        >>> tuner = tune.Tuner(metaopt_trainable, param_space={
        ...     "task": "teacher_student", "meta": "rl",
        ...     "meta_config": {"shared_policy": "shared_policy"}},
        ...     run_config=tune.RunConfig(callbacks=[callback]))
    """

    def __init__(
        self,
        *,
        policy_name: str | None = None,
        policy_config: Mapping[str, Any] | None = None,
        policy_namespace: str = "ray_metaopt",
        policy_checkpoint_uri: str | None = None,
        policy_save_path: str | os.PathLike | None = None,
        max_restarts: int = -1,
        stats_interval_s: float = 10.0,
        stats_timeout_s: float = 30.0,
        trajectory_dir: str | os.PathLike | None = None,
        write_interval_s: float = 30.0,
        add_policy_stats_to_results: bool = True,
    ) -> None:
        if policy_name is not None and (not isinstance(policy_name, str) or not policy_name):
            raise TypeError(f"policy_name must be a non-empty str or None, got policy_name={policy_name!r}")
        if policy_config is not None and not isinstance(policy_config, Mapping):
            raise TypeError(f"policy_config must be a dict or None, got policy_config={policy_config!r}")
        if policy_config is not None:
            from ..rl.policy import PolicyConfig

            PolicyConfig.from_dict(policy_config)  # unknown keys and bad values fail here, not in setup()
        if policy_checkpoint_uri is not None:
            policy_checkpoint_uri = check_path("policy_checkpoint_uri", policy_checkpoint_uri)
        if policy_save_path is not None:
            policy_save_path = check_path("policy_save_path", policy_save_path)
        if trajectory_dir is not None:
            trajectory_dir = check_path("trajectory_dir", trajectory_dir)
        if policy_config is not None and policy_name is None:
            raise ValueError(
                "policy_config is given but policy_name is None; name the policy actor to create"
            )
        if policy_save_path is not None and policy_name is None:
            raise ValueError("policy_save_path is given but policy_name is None; there is no policy to save")
        if not isinstance(policy_namespace, str) or not policy_namespace:
            raise TypeError(
                f"policy_namespace must be a non-empty str, got policy_namespace={policy_namespace!r}"
            )
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < -1:
            raise ValueError(f"max_restarts must be an int >= -1, got max_restarts={max_restarts!r}")
        if not isinstance(add_policy_stats_to_results, bool):
            raise TypeError(
                f"add_policy_stats_to_results must be a bool, got add_policy_stats_to_results={add_policy_stats_to_results!r}"
            )
        self.policy_name = policy_name
        self.policy_config = dict(policy_config) if policy_config is not None else None
        self.policy_namespace = policy_namespace
        self.policy_checkpoint_uri = policy_checkpoint_uri
        self.policy_save_path = os.fspath(policy_save_path) if policy_save_path is not None else None
        self.max_restarts = max_restarts
        self.stats_interval_s = check_range("stats_interval_s", stats_interval_s, 0.0)
        self.stats_timeout_s = check_range("stats_timeout_s", stats_timeout_s, 0.0, low_open=True)
        self.trajectory_dir = os.fspath(trajectory_dir) if trajectory_dir is not None else None
        self.write_interval_s = check_range("write_interval_s", write_interval_s, 0.0)
        self.add_policy_stats_to_results = add_policy_stats_to_results

        self.trajectories: dict[str, dict[str, Any]] = {}
        self.policy_stats: dict[str, Any] | None = None
        self.policy_stats_history: list[tuple[float, dict[str, Any]]] = []
        self.policy_actor: Any = None
        self.saved_policy_path: str | None = None
        self._pending_stats: Any = None
        self._last_stats_request = -math.inf
        self._trial_dirs: dict[str, str] = {}
        self._dirty: set[str] = set()
        self._last_write: dict[str, float] = {}

    # ------------------------------------------------------------ setup / policy actor
    def setup(
        self,
        stop: Any = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        if self.trajectory_dir is not None:
            os.makedirs(self.trajectory_dir, exist_ok=True)
        if self.policy_name is None:
            return
        try:
            from ..rl import start_policy_actor
        except ImportError as e:  # pragma: no cover - only without the rl subpackage
            raise ImportError(f"MetaOptCallback(policy_name=...) needs ray_metaopt.rl: {e}") from e
        self.policy_actor = start_policy_actor(
            self.policy_name,
            namespace=self.policy_namespace,
            policy_config=self.policy_config,
            checkpoint_uri=self.policy_checkpoint_uri,
            max_restarts=self.max_restarts,
        )
        logger.info(
            "MetaOptCallback: shared policy actor %r ready (namespace %r)",
            self.policy_name,
            self.policy_namespace,
        )

    def _poll_stats(self) -> None:
        """Pick up a finished ``stats`` reply (never waits) and send the next request when due."""
        if self.policy_actor is None:
            return
        if self._pending_stats is not None:
            ready, _ = ray.wait([self._pending_stats], timeout=0)
            if not ready:
                return
            ref, self._pending_stats = self._pending_stats, None
            self._receive_stats(ref, timeout=0)
        now = time.monotonic()
        if now - self._last_stats_request >= self.stats_interval_s:
            self._last_stats_request = now
            try:
                self._pending_stats = self.policy_actor.stats.remote()
            except ray.exceptions.RayError as e:  # e.g. the actor died for good
                logger.warning("MetaOptCallback: could not ask the policy actor for stats: %s", e)

    def _refresh_actor(self) -> bool:
        """After a call failed because the actor died: look the actor up again by name (it may have
        been started again, by Ray or by hand). Returns whether a live handle was found."""
        try:
            self.policy_actor = ray.get_actor(self.policy_name, namespace=self.policy_namespace)
        except ValueError:
            return False
        return True

    def _receive_stats(self, ref: Any, timeout: float) -> bool:
        """Take a stats reply; on a dead actor look it up again by name. Returns whether it worked."""
        try:
            stats = ray.get(ref, timeout=timeout)
        except ray.exceptions.RayActorError as e:
            logger.warning("MetaOptCallback: policy actor gone (%s); looking it up again by name", e)
            self._refresh_actor()
            return False
        except (ray.exceptions.RayError, TimeoutError) as e:
            logger.warning("MetaOptCallback: policy stats unavailable: %s", e)
            return False
        if not isinstance(stats, Mapping):
            logger.warning(
                "MetaOptCallback: policy actor returned stats of type %s, ignored", type(stats).__name__
            )
            return False
        self.policy_stats = dict(stats)
        self.policy_stats_history.append((time.time(), self.policy_stats))
        logger.info(
            "policy stats: version=%s updates=%s transitions=%s entropy=%s mean_return=%s dropped_stale=%s",
            stats.get("policy/version"),
            stats.get("policy/updates"),
            stats.get("rollouts/transitions"),
            stats.get("policy/entropy"),
            stats.get("policy/mean_return"),
            stats.get("rollouts/dropped_stale"),
        )
        return True

    def fetch_policy_stats(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Ask the policy actor for its stats now and wait up to ``timeout`` seconds for them."""
        if self.policy_actor is None:
            return None
        timeout = self.stats_timeout_s if timeout is None else timeout
        ref = self._pending_stats
        self._pending_stats = None
        for _ in range(2):  # a second time with the handle looked up again, if the actor was replaced
            handle = self.policy_actor
            if ref is None:
                try:
                    ref = handle.stats.remote()
                except ray.exceptions.RayError as e:
                    logger.warning("MetaOptCallback: could not ask the policy actor for stats: %s", e)
                    return self.policy_stats
            if self._receive_stats(ref, timeout=timeout) or self.policy_actor is handle:
                break
            ref = None
        return self.policy_stats

    def _scalar_policy_stats(self) -> dict[str, Any]:
        if not self.policy_stats:
            return {}
        return {
            k: v
            for k, v in self.policy_stats.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }

    # ------------------------------------------------------------ trajectories
    def _trajectory(self, trial: Trial) -> dict[str, Any]:
        trajectory = self.trajectories.get(trial.trial_id)
        if trajectory is None:
            trajectory = {
                "trial_id": trial.trial_id,
                "config": _trial_summary_config(trial.config),
                "status": "RUNNING",
                "records": [],
                "decisions": [],
                "reported_steps": [],
                "diverged": False,
                "error": None,
                "finished": None,
            }
            self.trajectories[trial.trial_id] = trajectory
        return trajectory

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._trajectory(trial)["status"] = "RUNNING"
        self._remember_dir(trial)

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any
    ) -> None:
        trajectory = self._trajectory(trial)
        flat = _flatten(result)
        record = {}
        for key, value in flat.items():
            if key in _RECORD_KEYS or key.startswith(_RECORD_PREFIXES):
                value = _plain_scalar(value)
                if value is not None:
                    record[key] = value
        if "step" not in record and "training_iteration" in record:
            record["step"] = record["training_iteration"]
        _rewind(trajectory, record.get("step"))
        trajectory["records"].append(record)
        if isinstance(record.get("step"), (int, float)):
            trajectory["reported_steps"].append(int(record["step"]))
        trajectory["diverged"] = trajectory["diverged"] or bool(record.get("diverged"))
        for decision in flat.get("meta/decisions") or ():
            if isinstance(decision, Mapping):
                trajectory["decisions"].append(
                    {k: _plain_scalar(decision.get(k)) for k in _DECISION_FIELDS if k in decision}
                )
        if self.add_policy_stats_to_results and self._uses_shared_policy(trial):
            if not self.policy_stats:
                # The first result fixes progress.csv's header: wait (once, up to 10 s) for the
                # stats so their keys are in it from the start.
                ref = self._pending_stats if self._pending_stats is not None else self.policy_actor.stats.remote()
                self._pending_stats = None
                self._receive_stats(ref, timeout=10.0)
            # Tune lets callbacks extend the result in place: loggers after us record these too.
            stats = self._scalar_policy_stats()
            self._shared_keys = getattr(self, "_shared_keys", set()) | set(stats)
            for key in sorted(self._shared_keys):  # a stable schema: a key once seen stays (NaN)
                result.setdefault(f"{SHARED_STATS_PREFIX}{key}", stats.get(key, math.nan))
        self._remember_dir(trial)
        self._dirty.add(trial.trial_id)

    def _uses_shared_policy(self, trial: Trial) -> bool:
        if self.policy_actor is None:
            return False
        meta_config = trial.config.get("meta_config")
        return isinstance(meta_config, Mapping) and meta_config.get("shared_policy") == self.policy_name

    def _end_trial(self, trial: Trial, status: str) -> None:
        trajectory = self._trajectory(trial)
        trajectory["status"] = status
        trajectory["finished"] = sum(
            1 for t in self.trajectories.values() if t is not trajectory and t.get("finished") is not None
        )
        if status == "ERROR":
            message = str(getattr(trial, "error_msg", None) or "trial raised an error").strip()
            trajectory["error"] = message.splitlines()[-1][:300] if message else None
        self._remember_dir(trial)
        self._write_trial(trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._end_trial(trial, "TERMINATED")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._end_trial(trial, "ERROR")

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        self._poll_stats()
        now = time.monotonic()
        for trial_id in list(self._dirty):
            if now - self._last_write.get(trial_id, -math.inf) >= self.write_interval_s:
                self._write_trial(trial_id)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        for trial_id in list(self._dirty):
            self._write_trial(trial_id)
        if self.policy_actor is None:
            return
        self.fetch_policy_stats()
        if self.policy_save_path is not None:
            self.save_policy(self.policy_save_path)

    def save_policy(self, path: str | os.PathLike) -> str | None:
        """Save the shared policy's current state to ``path`` with ``ray_metaopt.rl.save_policy``."""
        from ..rl import save_policy

        path = os.fspath(path)
        try:
            try:
                state = ray.get(self.policy_actor.policy_state.remote(), timeout=self.stats_timeout_s)
            except ray.exceptions.RayActorError:
                if not self._refresh_actor():  # replaced? save the live actor's policy
                    raise
                state = ray.get(self.policy_actor.policy_state.remote(), timeout=self.stats_timeout_s)
        except (ray.exceptions.RayError, TimeoutError) as e:
            logger.error("MetaOptCallback: could not fetch the policy state to save it to %s: %s", path, e)
            return None
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_policy(path, state)
        self.saved_policy_path = path
        logger.info("MetaOptCallback: saved the shared policy to %s", path)
        return path

    # ------------------------------------------------------------ files
    def _remember_dir(self, trial: Trial) -> None:
        if trial.trial_id not in self._trial_dirs:
            try:
                path = trial.local_path
            except RuntimeError:  # Tune has not named the trial dir yet (not once it started)
                return
            if path:
                self._trial_dirs[trial.trial_id] = path

    def _write_trial(self, trial_id: str) -> None:
        trajectory = self.trajectories.get(trial_id)
        self._dirty.discard(trial_id)
        self._last_write[trial_id] = time.monotonic()
        if trajectory is None:
            return
        targets = []
        if trial_id in self._trial_dirs:
            d = self._trial_dirs[trial_id]
            targets.append(
                (
                    os.path.join(d, TRAJECTORY_JSON),
                    os.path.join(d, TRAJECTORY_CSV),
                    os.path.join(d, DECISIONS_CSV),
                )
            )
        if self.trajectory_dir is not None:
            d = self.trajectory_dir
            targets.append(
                (
                    os.path.join(d, f"{trial_id}.json"),
                    os.path.join(d, f"{trial_id}.csv"),
                    os.path.join(d, f"{trial_id}_decisions.csv"),
                )
            )
        for json_path, csv_path, decisions_path in targets:
            try:
                write_trajectory(trajectory, json_path, csv_path, decisions_path)
            except OSError as e:
                logger.warning(
                    "MetaOptCallback: could not write trajectory of %s to %s: %s", trial_id, json_path, e
                )

    # ------------------------------------------------------------ experiment restore
    def get_state(self) -> dict | None:
        return {
            "trajectories": self.trajectories,
            "policy_stats": self.policy_stats,
            "saved_policy_path": self.saved_policy_path,
        }

    def set_state(self, state: dict) -> None:
        self.trajectories = dict(state.get("trajectories", {}))
        self.policy_stats = state.get("policy_stats")
        self.saved_policy_path = state.get("saved_policy_path")


def write_trajectory(
    trajectory: Mapping[str, Any],
    json_path: str | os.PathLike,
    csv_path: str | os.PathLike | None = None,
    decisions_csv_path: str | os.PathLike | None = None,
) -> None:
    """Write one trial's trajectory: the full JSON, a CSV of its records, a CSV of its decisions.

    Args:
        trajectory: one value of :attr:`MetaOptCallback.trajectories`.
        json_path: where the JSON goes (written atomically: temp file + rename).
        csv_path: one row per report; columns are the union of every record's keys.
        decisions_csv_path: one row per applied hyperparameter change.

    Example:
        >>> write_trajectory(callback.trajectories[trial_id], "t.json", "t.csv", "t_decisions.csv")
    """
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    # The temp file goes outside the trial directory: Tune's syncer copies the driver's directory
    # while trials run, and a temp file beside the JSON can vanish between its listing and its copy
    # (a "Last sync command failed ... .json.tmp" warning with a traceback).
    fd, tmp = tempfile.mkstemp(prefix="metaopt_trajectory_", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_json_safe(dict(trajectory)), f, indent=1)
        try:
            os.replace(tmp, json_path)
        except OSError:  # another filesystem: copy beside the JSON, then rename there
            beside = f"{json_path}.tmp"
            shutil.copyfile(tmp, beside)
            os.replace(beside, json_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    records = trajectory.get("records", [])
    if csv_path is not None:
        columns: list[str] = []
        for record in records:
            columns.extend(k for k in record if k not in columns)
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(records)
    if decisions_csv_path is not None:
        with open(decisions_csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(_DECISION_FIELDS), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(trajectory.get("decisions", []))


def read_trajectory(path: str | os.PathLike) -> dict[str, Any]:
    """Load a trajectory JSON written by :class:`MetaOptCallback` (``"nan"``/``"inf"`` strings -> floats)."""
    with open(path) as f:
        data = json.load(f)
    return _map_leaves(data, lambda x: float(x) if isinstance(x, str) and x in ("nan", "inf", "-inf") else x)
