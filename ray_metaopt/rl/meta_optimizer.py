"""The :class:`RLMetaOptimizer`: a REINFORCE policy that chooses lr and weight-decay changes."""

from __future__ import annotations

import contextlib
import copy
import math
import pickle
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch

from .._validation import check_choice, check_int, check_range
from ..base import GroupState, HParamUpdate, MetaOptimizer
from ..schedules import SCHEDULE_SHAPES
from .features import FeatureExtractor
from .persistence import load_policy, load_policy_for, policy_state_from_learner
from .policy import PolicyConfig, argmax, sample_index, uniform
from .reinforce import Learner, single_threaded
from .rewards import REFERENCE_LOSS, REFERENCE_VAL_LOSS, clip, final_term, interval_reward
from .rollout import finalize

SCHEDULES = SCHEDULE_SHAPES  # the base schedules of the "schedule" and "anchored" action modes
_DEFAULT_SCALE_BOUNDS = {"anchored": (1e-3, 10.0), "multiplicative": (1e-3, 10.0), "schedule": (0.25, 4.0)}
_PROBE_POINTS = tuple(i / 20 for i in range(21))
_LOSS_EMA_RATE = 0.1
# The "mean" readout ignores moves smaller than this (log lr; fraction of the largest wd shift).
_MEAN_EPS = 0.01
_FROZEN_ACTIONS = ("mean", "greedy", "sample")


def _prior_mean(values: Sequence[float], keep: int, keep_prob: float | None) -> float:
    """E[value] under the initial policy (``keep_prob`` on ``keep``, the rest shared equally)."""
    n = len(values)
    if n == 0:
        return 0.0
    if keep_prob is None or n == 1:
        return sum(values) / n
    rest = (1.0 - keep_prob) / (n - 1)
    return sum((keep_prob if i == keep else rest) * v for i, v in enumerate(values))


def _frozen_action(frozen_action: str | None, greedy: bool | None, frozen: bool) -> str:
    """Resolve ``frozen_action`` and its older spelling ``greedy`` (checked together)."""
    if greedy is not None:
        greedy = _check_bool("greedy", greedy)
        implied = "greedy" if greedy else "sample"
        if frozen_action is not None and frozen_action != implied:
            raise ValueError(
                f"greedy={greedy} contradicts frozen_action={frozen_action!r}; give only frozen_action"
            )
        if greedy and not frozen:
            raise ValueError(
                "greedy=True needs frozen=True: REINFORCE learns only from sampled actions, "
                "got greedy=True, frozen=False"
            )
        frozen_action = implied
    if frozen_action is None:
        return "mean" if frozen else "sample"
    check_choice("frozen_action", frozen_action, _FROZEN_ACTIONS)
    if frozen_action != "sample" and not frozen:
        raise ValueError(
            f"frozen_action={frozen_action!r} needs frozen=True: REINFORCE learns only from sampled "
            f"actions, got frozen_action={frozen_action!r}, frozen=False"
        )
    return frozen_action


def _clone_tree(obj: Any) -> Any:
    """A copy of nested dicts/lists/tuples of tensors and plain values, tensors cloned.

    What a learner's ``state_dict()`` holds; ~5x cheaper than ``copy.deepcopy`` on it (no memo,
    no storage round trip), which was a quarter of a learning decision's time.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_tree(v) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return copy.deepcopy(obj)


def _check_schedule(schedule: Callable[[float], float], name: str = "base_schedule") -> None:
    """A base schedule must give a finite, non-negative factor at every progress: checked on a grid."""
    for p in _PROBE_POINTS:
        try:
            value = float(schedule(p))
        except (TypeError, ValueError, ArithmeticError) as exc:
            raise ValueError(f"{name}({p}) failed: {exc}") from exc
        if not math.isfinite(value) or value < 0.0:
            raise ValueError(
                f"{name} must return a finite, non-negative lr factor, got {name}({p})={value!r}"
            )


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {name}={value!r}")
    return value


class RLMetaOptimizer(MetaOptimizer):
    """Learns, with REINFORCE, when to change the learning rate and weight decay.

    Every ``update_frequency`` steps the policy sees a state built from the training dynamics
    (loss level and trends over three horizons, gradient-norm level and trend, lr and weight
    decay relative to their start, progress through the run, step-time cost, the validation gap;
    see :mod:`~ray_metaopt.rl.features`) and picks one lr action and one weight-decay action. The
    reward of an action is the log-loss improvement over the interval that follows it, per
    ``update_frequency`` steps (so adaptive intervals stay comparable), minus ``cost_weight``
    times the cost (``cost_metric``), plus, at the end of the run, ``val_weight`` times the
    log-improvement of ``val_loss`` when one was reported. Returns discount later rewards by
    ``gamma``; the update uses a baseline and an entropy bonus (:mod:`~ray_metaopt.rl.reinforce`).

    Paired reference: when the metrics also carry ``reference_loss`` (and, at evaluations,
    ``reference_val_loss``), the losses of a run with the same seed and initial lr on the base
    schedule alone, each reward is measured against the reference's over the same steps
    (:mod:`~ray_metaopt.rl.rewards`). The trainable provides them with ``paired_reference=True``.

    Learning happens in this process (``shared_policy=None``) or in a shared
    :class:`~ray_metaopt.rl.PolicyActor` that every trial of an experiment feeds
    (``shared_policy="<actor name>"``, started by the driver with
    :func:`~ray_metaopt.rl.start_policy_actor`). With a shared policy the trial acts with a local
    copy of the weights, sends finished transitions without waiting, and picks up new weights
    when they are ready; if the actor is unreachable it keeps its last weights and reconnects.

    Action modes (``action_mode``):

    - ``"anchored"`` (default): every decision sets ``lr = base_lr(t) * lr_actions[i] ** ramp``,
      re-anchored at every decision, never compounding: ``lr_actions=[0.5, 1.0, 2.0]`` means
      x0.5 / x1 / x2 of the base at that moment. The base is the user's schedule: with
      ``base_schedule=None`` whatever sets the lr without the policy (the initial lr, or an
      attached torch LR scheduler: the wrapper's ``attach_scheduler`` keeps the scheduler's
      ``base_lrs`` scaled by the multiplier, so ``lr / multiplier`` is the scheduler's value);
      with a named or callable ``base_schedule``, ``initial_lr * base_schedule(progress)``
      (needs ``total_steps``). ``ramp = min(1, progress / anchor_warmup)`` grows the action's
      effect from 0 (SOLAR's ``base * exp(alpha * a)`` with ``a = log(action)``, ``alpha`` ramped).
      Weight decay: ``weight_decay = max(initial_wd + wd_actions[j], 0)``. The "keep" action
      (multiplier 1, shift 0) leaves the base schedule exactly as it is.
    - ``"multiplicative"`` (the seed's, opt-in): ``lr *= lr_actions[i]``,
      ``weight_decay += wd_actions[j]``; compounds, kept within ``lr_scale_bounds`` times the
      initial lr. Measured: the lr random-walks (0.02 -> 0.1 on one seed, -> 2e-5 on another in
      the main job) and the trained policy ended x1.117 a tuned cosine.
    - ``"schedule"``: ``lr = initial_lr * base_schedule(progress) * scale`` where the action
      multiplies ``scale`` within ``lr_scale_bounds`` (compounding on a schedule); needs
      ``total_steps``. Do not attach a torch LR scheduler in this mode.

    Circuit breaker (``breaker_factor``): when the loss at a decision exceeds ``breaker_factor``
    times its running EMA, every group goes back to its base lr (multiplier 1) at once, the last
    action gets the reward ``-breaker_penalty``, and the decision is logged with the reason.

    Evaluation (``frozen_action``, a frozen policy only): ``"mean"`` (the default) applies the
    policy's *expected* action relative to its prior: ``lr multiplier = keep x exp(E_pi[log a] -
    E_prior[log a])`` (weight decay: the keep shift + the expected shift - the prior's), i.e. how
    far learning moved the policy from its initial keep-biased prior, and ignores moves under 1% of
    the lr (like torch ``ReduceLROnPlateau``'s
    ``eps``). ``"greedy"`` takes the most probable action; ``"sample"`` samples as in training.
    Why "mean": a policy trained from a keep prior of 0.8 can shift a lot of probability to x0.5
    late in training and still have "keep" as its argmax, so greedy evaluation threw the learned
    behaviour away (measured: every greedy decision of the trained benchmark policy was "keep").
    A fresh policy's mean and greedy actions are both "keep", so frozen and untrained it
    reproduces the base schedule bit for bit. Exploration (sampling) happens only while learning.

    Stop action (``stop_action=True``, the cost objective's action): a third head chooses, at
    every decision, "continue" or "stop this run now". A stop ends the episode at once (no lr
    change, the final term as at a normal end), sets :attr:`stop_requested` to the reason and
    calls ``on_stop(reason)``: the provided trainable passes its own callback and ends the trial
    with that ``stop_reason`` (``"policy_stop: ..."``, shown in Tune's results). Without a way to
    stop, ``stop_action=True`` is refused at construction. The stop head learns from its own
    return, the *absolute* drop of log ``val_loss`` (``loss`` where no ``val_loss`` is reported)
    over the next ``return_horizon`` intervals times ``val_weight``, minus ``cost_weight`` x the
    cost of their steps, undiscounted: stopping is worth it where the improvement left is worth
    less than the steps it costs. A paired reference does not enter it (stopping gives up the
    improvement the reference gets too). With ``cost_weight=0`` stopping pays only where the
    loss rises (early stopping). While learning it explores with ``initial_stop_prob`` *per
    decision*, so a learning run of D decisions is cut at random with probability
    1 - (1 - p)^D: keep D small (decide at evaluations) or p small. Frozen, it stops when
    ``p(stop) > 0.5`` (``frozen_action="sample"``: sampled), so an untrained, frozen policy with
    the default mean readout (or greedy) never stops. ASHA and this are different tools: ASHA compares trials of a population at rungs and
    stops the worse ones (to find the best config with fewer steps); the stop action ends each run
    by its own state when continuing costs more than it gains (to save steps on every run).
    Measured against ASHA: ``benchmarks/stop_vs_asha/results.md`` (it did not beat a fixed budget).

    ``per_group=True`` chooses actions for each param group separately (one state row per group,
    one shared network); otherwise one action applies to every group.

    Determinism: with a ``seed`` a local run is reproducible, and a run resumed from
    ``OptimizerWrapper.state_dict()`` decides bit for bit like an uninterrupted one. With a shared
    policy, *when* new weights arrive depends on timing, so runs are not reproducible.

    :meth:`reset` starts a new episode (features, pending rewards, schedule scales) and keeps the
    learned policy and the sampling stream (a new episode draws new numbers).

    Args:
        update_frequency: decide every this many steps (the seed's default is 10 here).
        lr_actions: lr multipliers to choose from.
        wd_actions: weight-decay shifts to choose from (``None``: no weight-decay actions).
        policy_lr: Adam learning rate of the policy.
        entropy_weight: weight of the entropy bonus.
        action_mode: ``"anchored"`` (default), ``"multiplicative"`` or ``"schedule"``.
        per_group: one action per param group instead of one for all.
        base_schedule: ``None`` (anchored: the optimizer's own lr / attached scheduler; schedule
            mode: cosine), ``"cosine"``, ``"linear"``, ``"constant"`` or ``f(progress) -> factor``
            (finite and >= 0 on [0, 1], checked at construction).
        anchor_warmup: anchored mode: fraction of the run over which the actions' effect ramps
            up from none (0: full effect at once; needs ``total_steps`` to matter).
        breaker_factor: circuit-breaker threshold on loss / loss EMA (``None``: no breaker).
        breaker_penalty: reward of an action followed by a trip (``None``: ``-reward_clip``).
        lr_scale_bounds: ``(low, high)`` bounds of lr / reference lr (initial lr, or the base
            schedule's value in schedule mode). Default ``(1e-3, 10)`` / ``(0.25, 4)``.
        hidden_size, initial_keep_prob, max_grad_norm, batch_size, gamma, return_horizon,
            normalize_advantages, baseline_decay, baseline: see :class:`~ray_metaopt.rl.PolicyConfig`.
        importance_clip: clip of importance weights of transitions from older weights (local).
        cost_metric: metric that measures cost per step (``"step_time"``), or ``"steps"`` (every
            step costs 1; a constant, so it only matters when runs can stop early).
        cost_weight: reward units given up per unit of cost per ``update_frequency`` steps.
        val_weight: weight of the final ``val_loss`` term.
        reward_clip: rewards are clamped to ``[-reward_clip, reward_clip]``.
        loss_floor: lower bound of the loss (log-losses are of ``loss - loss_floor``).
        total_steps: steps of the run when known: gives the ``progress`` feature and ends the
            episode (final reward, flush) at the last decision.
        seed: seed of the initial weights and of action sampling (``None``: random, recorded in
            the state dict so a resume continues the same stream).
        shared_policy: name of a :class:`~ray_metaopt.rl.PolicyActor` to learn with (``None``:
            learn locally).
        policy_namespace: Ray namespace of the shared actor.
        segment_size: transitions sent to the actor at once.
        sync_interval_s: seconds between checks for new shared weights (no Ray call in between).
        reconnect_interval_s: seconds between attempts to reach an unreachable actor.
        policy_path: start from a policy saved by :func:`~ray_metaopt.rl.save_policy`.
        frozen: do not learn (and send nothing); act with the policy as it is.
        frozen_action: how a frozen policy acts: ``"mean"`` (default), ``"greedy"`` or ``"sample"``
            (see Evaluation above). Needs ``frozen=True`` unless it is ``"sample"`` or ``None``.
        greedy: the older spelling: ``True`` is ``frozen_action="greedy"``, ``False`` is
            ``"sample"`` (``None``: ``frozen_action`` decides).
        stop_action: add the "stop this run now" action (see Stop action above).
        initial_stop_prob: the untrained stop head's probability of stopping at a decision.
        on_stop: ``f(reason)``, called once when the policy stops the run (required with
            ``stop_action=True``; the provided trainable passes its own). It is not part of the
            state: a deserialised or copied object has ``on_stop=None`` (set it again, or check
            :attr:`stop_requested` after each decision and after ``load_state_dict``, which
            restores a stopped run stopped without calling it).
        **base: the other :class:`~ray_metaopt.MetaOptimizer` arguments, by keyword: ``min_lr``,
            ``max_lr``, ``max_weight_decay``, ``adaptive_frequency``.

    Example:
        >>> meta_opt = RLMetaOptimizer(update_frequency=10, lr_actions=[0.5, 1.0, 2.0],
        ...     wd_actions=[-1e-5, 0.0, 1e-5], policy_lr=1e-4, entropy_weight=0.01)
        >>> opt = OptimizerWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3), meta_opt)
    """

    _state_attrs: ClassVar[tuple[str, ...]] = (
        "seed",
        "features",
        "draws",
        "pending",
        "ready",
        "scales",
        "multipliers",
        "loss_ema",
        "decision_index",
        "episode_done",
        "reference",
        "counters",
        "stop_reason",
        "last_log_val",
        "stop_credit",
        "learner_state",
    )

    def __init__(
        self,
        update_frequency: int = 10,
        lr_actions: Sequence[float] = (0.5, 1.0, 2.0),
        wd_actions: Sequence[float] | None = (-1e-5, 0.0, 1e-5),
        policy_lr: float = 1e-4,
        entropy_weight: float = 0.01,
        *,
        action_mode: str = "anchored",
        per_group: bool = False,
        base_schedule: str | Callable[[float], float] | None = None,
        anchor_warmup: float = 0.1,
        breaker_factor: float | None = 1.5,
        breaker_penalty: float | None = None,
        lr_scale_bounds: tuple[float, float] | None = None,
        hidden_size: int = 32,
        initial_keep_prob: float | None = 0.8,
        max_grad_norm: float = 1.0,
        batch_size: int = 32,
        gamma: float = 0.9,
        return_horizon: int = 20,
        normalize_advantages: bool = True,
        baseline_decay: float = 0.9,
        baseline: str = "average",
        importance_clip: float = 2.0,
        cost_metric: str = "step_time",
        cost_weight: float = 0.0,
        val_weight: float = 1.0,
        reward_clip: float = 5.0,
        loss_floor: float = 0.0,
        total_steps: int | None = None,
        seed: int | None = None,
        shared_policy: str | None = None,
        policy_namespace: str = "ray_metaopt",
        segment_size: int = 8,
        sync_interval_s: float = 0.5,
        reconnect_interval_s: float = 5.0,
        policy_path: str | None = None,
        frozen: bool = False,
        frozen_action: str | None = None,
        greedy: bool | None = None,
        stop_action: bool = False,
        initial_stop_prob: float = 0.02,
        on_stop: Callable[[str], Any] | None = None,
        **base: Any,
    ) -> None:
        super().__init__(update_frequency, **base)
        if on_stop is not None and not callable(on_stop):
            raise TypeError(f"on_stop must be a callable f(reason) or None, got on_stop={on_stop!r}")
        if stop_action is True and on_stop is None:
            raise ValueError(
                "stop_action=True needs a way to stop the run: pass on_stop=f(reason) that ends your "
                "training loop (the provided Tune trainable passes its own), got on_stop=None"
            )
        self.on_stop = on_stop
        seed = secrets.randbits(31) if seed is None else check_int("seed", seed, minimum=0)
        self.config = PolicyConfig(
            lr_actions=lr_actions,
            wd_actions=wd_actions,
            action_mode=action_mode,
            hidden_size=hidden_size,
            initial_keep_prob=initial_keep_prob,
            policy_lr=policy_lr,
            entropy_weight=entropy_weight,
            max_grad_norm=max_grad_norm,
            batch_size=batch_size,
            gamma=gamma,
            return_horizon=return_horizon,
            normalize_advantages=normalize_advantages,
            baseline_decay=baseline_decay,
            baseline=baseline,
            seed=seed,
            stop_action=stop_action,
            initial_stop_prob=initial_stop_prob,
        )
        self.per_group = _check_bool("per_group", per_group)
        if base_schedule is None and action_mode == "schedule":
            base_schedule = "cosine"
        if base_schedule is None:
            self._schedule: Callable[[float], float] | None = None
        elif callable(base_schedule):
            _check_schedule(base_schedule)
            self._schedule = base_schedule
        else:
            self._schedule = SCHEDULES[check_choice("base_schedule", base_schedule, tuple(SCHEDULES))]
        self.base_schedule = base_schedule
        self.anchor_warmup = check_range("anchor_warmup", anchor_warmup, 0.0, 1.0)
        self.breaker_factor = (
            None
            if breaker_factor is None
            else check_range("breaker_factor", breaker_factor, 1.0, math.inf, low_open=True, high_open=True)
        )
        bounds = _DEFAULT_SCALE_BOUNDS[action_mode] if lr_scale_bounds is None else lr_scale_bounds
        if not isinstance(bounds, Sequence) or len(bounds) != 2:
            raise TypeError(
                f"lr_scale_bounds must be a (low, high) pair, got lr_scale_bounds={lr_scale_bounds!r}"
            )
        low = check_range("lr_scale_bounds[0]", bounds[0], 0.0, 1.0, low_open=True)
        high = check_range("lr_scale_bounds[1]", bounds[1], 1.0, math.inf, high_open=True)
        self.lr_scale_bounds = (low, high)
        if not isinstance(cost_metric, str) or not cost_metric:
            raise TypeError(f"cost_metric must be a metric name or 'steps', got cost_metric={cost_metric!r}")
        self.cost_metric = cost_metric
        self.cost_weight = check_range("cost_weight", cost_weight, 0.0, math.inf, high_open=True)
        self.val_weight = check_range("val_weight", val_weight, 0.0, math.inf, high_open=True)
        self.reward_clip = check_range(
            "reward_clip", reward_clip, 0.0, math.inf, low_open=True, high_open=True
        )
        self.breaker_penalty = (
            self.reward_clip
            if breaker_penalty is None
            else check_range("breaker_penalty", breaker_penalty, 0.0, math.inf, high_open=True)
        )
        self.total_steps = None if total_steps is None else check_int("total_steps", total_steps, minimum=1)
        if action_mode == "schedule" and self.total_steps is None:
            raise ValueError(
                "action_mode='schedule' needs total_steps (the base schedule's length), got total_steps=None"
            )
        if action_mode == "anchored" and self._schedule is not None and self.total_steps is None:
            raise ValueError(
                f"action_mode='anchored' with base_schedule={base_schedule!r} needs total_steps "
                "(the base schedule's length), got total_steps=None; or use base_schedule=None to "
                "anchor on the optimizer's own lr (initial lr or attached scheduler)"
            )
        if shared_policy is not None and (not isinstance(shared_policy, str) or not shared_policy):
            raise TypeError(
                f"shared_policy must be an actor name (str) or None, got shared_policy={shared_policy!r}"
            )
        self.shared_policy = shared_policy
        if not isinstance(policy_namespace, str) or not policy_namespace:
            raise TypeError(
                f"policy_namespace must be a non-empty str, got policy_namespace={policy_namespace!r}"
            )
        self.policy_namespace = policy_namespace
        self.segment_size = check_int("segment_size", segment_size, minimum=1)
        self.sync_interval_s = check_range("sync_interval_s", sync_interval_s, 0.0, math.inf, high_open=True)
        self.reconnect_interval_s = check_range(
            "reconnect_interval_s", reconnect_interval_s, 0.0, math.inf, high_open=True
        )
        self.frozen = _check_bool("frozen", frozen)
        self.frozen_action = _frozen_action(frozen_action, greedy, self.frozen)
        self.greedy = self.frozen_action == "greedy"
        self._log_lr_actions = [math.log(a) for a in self.config.lr_actions]  # the "mean" readout's
        wd_unit = max((abs(a) for a in self.config.wd_actions or () if a != 0.0), default=1e-5)
        self._features = FeatureExtractor(
            update_frequency=self.update_frequency,
            total_steps=self.total_steps,
            wd_unit=wd_unit,
            loss_floor=loss_floor,
        )
        self.learner = Learner(self.config, importance_clip=importance_clip)
        self.policy_path = policy_path
        if policy_path is not None:
            self._load_policy_file(policy_path)
        self._client: Any = None
        self.reset()

    # ---------------------------------------------------------------- construction helpers
    @classmethod
    def from_pretrained(cls, name: str, **kwargs: Any) -> RLMetaOptimizer:
        """An RLMetaOptimizer that starts from a policy shipped with the package (frozen by default).

        Args:
            name: a shipped policy (:func:`ray_metaopt.rl.pretrained.available`; its card:
                :func:`ray_metaopt.rl.pretrained.card`).
            kwargs: as for :meth:`from_policy`; ``frozen=False`` keeps learning from it.

        Raises:
            ValueError: ``name`` is not shipped (the message lists the shipped ones).

        Example:
            >>> meta = RLMetaOptimizer.from_pretrained("anchored-cosine-v1", total_steps=1000)
        """
        from . import pretrained

        return cls.from_policy(pretrained.policy_path(name), **{"frozen": True, **kwargs})

    @classmethod
    def from_policy(cls, policy_path: str, **kwargs: Any) -> RLMetaOptimizer:
        """An RLMetaOptimizer whose action space and policy settings are those of a saved policy.

        ``kwargs`` override the saved settings and give the rest (``update_frequency``,
        ``total_steps``, ``frozen``, ...).

        Example:
            >>> meta = RLMetaOptimizer.from_policy("policy.pt", frozen=True, greedy=True, total_steps=1000)
        """
        saved = load_policy(policy_path)["config"]
        saved.pop("seed", None)
        return cls(policy_path=policy_path, **{**saved, **kwargs})

    def _load_policy_file(self, path: str) -> None:
        hint = "pass the same values, or use RLMetaOptimizer.from_policy(path, ...) to take them from the file"
        self.learner.load_state_dict(load_policy_for(self.config, path, hint))

    # ---------------------------------------------------------------- state
    def _init_state(self) -> None:
        self.seed = self.config.seed  # also recorded when drawn at random (seed=None)
        self.features = self._features.initial_state()
        self.draws = getattr(self, "draws", 0)  # uniform draws so far (the sampling RNG's counter)
        self.pending: list[dict[str, Any]] = []  # acted, return not known yet
        self.ready: list[dict[str, Any]] = []  # return known, not learned from / sent yet
        self.scales: list[float] = []  # schedule mode: per-group multiplier on the base schedule
        self.multipliers: list[float] = []  # anchored mode: per-group multiplier now applied to the base
        self.loss_ema: float | None = None  # circuit breaker's running loss level
        # The paired reference's log-loss at the latest decision and its latest val_loss (None: not reported).
        self.reference: dict[str, float | None] = {"log_loss": None, "val_loss": None}
        self.decision_index = 0
        self.episode_done = False
        self.stop_reason: str | None = None  # set when the stop action ended the run
        self.last_log_val: float | None = None  # the stop reward's previous log val_loss
        self.stop_credit = 0.0  # loss drops credited to the stop head since that val_loss
        self.counters = {
            "decisions": 0,
            "transitions": 0,
            "skipped_transitions": 0,
            "sent_transitions": 0,
            "local_updates": 0,
            "breaker_trips": 0,
            "stops": 0,
        }

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """:meth:`MetaOptimizer.atomic` without copying the policy at every decision.

        The episode state is copied up front (it is small); the policy's weights and Adam state are
        copied only when this decision is about to change them (a local update, new shared
        weights), which is once per batch at most instead of at every decision (measured: the full
        copy was 77% of a frozen decision's time).
        """
        # Plain data (numbers, lists, dicts): a pickle round trip copies it ~5x faster than deepcopy.
        episode = pickle.dumps({a: getattr(self, a) for a in self._state_attrs if a != "learner_state"}, protocol=5)
        schedule = (self.interval, self.next_update_step, self.last_update_step, self._last_monitored)
        self._learner_backup: dict[str, Any] | None = None
        self._in_decision = True
        try:
            yield
        except BaseException:
            for attr, value in pickle.loads(episode).items():
                setattr(self, attr, value)
            self.interval, self.next_update_step, self.last_update_step, self._last_monitored = schedule
            if self._learner_backup is not None:
                self.learner.load_state_dict(self._learner_backup)
            raise
        finally:
            self._in_decision = False
            self._learner_backup = None

    def _before_learner_changes(self) -> None:
        """Inside :meth:`atomic`: keep a copy of the policy before its first change in this decision."""
        if getattr(self, "_in_decision", False) and self._learner_backup is None:
            self._learner_backup = _clone_tree(self.learner.state_dict())  # it holds live Adam tensors

    @property
    def learner_state(self) -> dict[str, Any]:
        """The policy's weights, optimizer, baseline and version (part of :meth:`state_dict`)."""
        return self.learner.state_dict()

    @learner_state.setter
    def learner_state(self, state: Mapping[str, Any]) -> None:
        self.learner.load_state_dict(state)

    def policy_state(self) -> dict[str, Any]:
        """The policy as :func:`~ray_metaopt.rl.save_policy` writes it."""
        return policy_state_from_learner(self.learner)

    @property
    def stop_requested(self) -> str | None:
        """Why the stop action ended this run (``None``: it has not)."""
        return self.stop_reason

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None  # a connection is not part of the object's value
        state["on_stop"] = None  # nor is the caller's callback (often a bound method of its loop)
        return state

    # ---------------------------------------------------------------- deciding
    def decide(
        self, metrics: Mapping[str, float], step: int, groups: Sequence[GroupState]
    ) -> list[HParamUpdate]:
        if "loss" not in metrics:
            raise ValueError(
                f"RLMetaOptimizer needs the metric 'loss' at every decision step, got metrics {sorted(metrics)}"
            )
        if self.stop_reason is not None:
            return []  # the run was stopped; a caller that trains on gets no more decisions
        self._sync_shared_policy()
        end = (
            self.total_steps is not None
            and not self.episode_done
            and step + self.interval >= self.total_steps
        )
        trip = self._breaker(metrics["loss"])
        rewarded = self._observe(metrics, step, final=end, penalty=trip)
        if trip:
            self.counters["breaker_trips"] += 1
            updates = self._back_to_base(step, groups, metrics["loss"])
            if end:
                self._end_episode(final_term_given=rewarded)
            return updates
        if end:
            self._end_episode(final_term_given=rewarded)
            return []  # no interval left to act on
        return self._act(step, groups)

    def _breaker(self, loss: float) -> bool:
        """Update the loss EMA; whether ``loss`` is a spike above ``breaker_factor`` x the EMA."""
        level = max(float(loss) - self._features.loss_floor, 0.0)
        ema = self.loss_ema
        self.loss_ema = level if ema is None else ema + _LOSS_EMA_RATE * (level - ema)
        return self.breaker_factor is not None and ema is not None and ema > 0.0 and level > self.breaker_factor * ema

    def _back_to_base(self, step: int, groups: Sequence[GroupState], loss: float) -> list[HParamUpdate]:
        """Circuit breaker: every group back on its base lr (multiplier 1) at once."""
        reason = (
            f"rl: circuit breaker: loss {float(loss):.4g} > {self.breaker_factor:g} x EMA "
            f"{self.loss_ema:.4g}, back to base lr"
        )
        progress = self._features.progress(step)
        updates = []
        for g in groups:
            if self.config.action_mode == "anchored":
                base = self._anchored_base(g, progress)
                self._set_multiplier(g.index, 1.0)
                if base is not None and base != g.lr:
                    updates.append(HParamUpdate(g.index, "lr", base, reason))
            elif self.config.action_mode == "schedule":
                while len(self.scales) <= g.index:
                    self.scales.append(1.0)
                self.scales[g.index] = 1.0
                base = g.initial_lr * self._schedule(progress if progress is not None else 0.0)
                if base != g.lr:
                    updates.append(HParamUpdate(g.index, "lr", base, reason))
            elif g.lr != g.initial_lr and g.initial_lr > 0.0:
                updates.append(HParamUpdate(g.index, "lr", g.initial_lr, reason))
        return updates

    def _multiplier(self, index: int) -> float:
        return self.multipliers[index] if index < len(self.multipliers) else 1.0

    def _set_multiplier(self, index: int, value: float) -> None:
        while len(self.multipliers) <= index:
            self.multipliers.append(1.0)
        self.multipliers[index] = value

    def _anchored_base(self, g: GroupState, progress: float | None) -> float | None:
        """The group's base lr now: the schedule's value, or the lr without this policy's multiplier."""
        if self._schedule is not None:
            return g.initial_lr * float(self._schedule(progress if progress is not None else 0.0))
        m = self._multiplier(g.index)
        return g.lr / m if m > 0.0 else None

    def _observe(self, metrics: Mapping[str, float], step: int, *, final: bool, penalty: bool = False) -> bool:
        """Update the features; give the last action its reward. Returns whether it got one."""
        prev_log_loss, prev_step = self.features["log_loss"], self.features["step"]
        self._features.observe(self.features, metrics, step)
        prev_ref = self.reference["log_loss"]
        ref_loss = metrics.get(REFERENCE_LOSS)
        self.reference["log_loss"] = None if ref_loss is None else self._features.log_loss(float(ref_loss))
        if metrics.get(REFERENCE_VAL_LOSS) is not None and "val_loss" in metrics:
            self.reference["val_loss"] = float(metrics[REFERENCE_VAL_LOSS])
        prev_log_val = self.last_log_val
        if "val_loss" in metrics:
            self.last_log_val = self._features.log_loss(float(metrics["val_loss"]))
        if (
            not self.pending
            or self.pending[-1]["reward"] is not None
            or prev_step is None
            or step <= prev_step
        ):
            return False
        # Per step, in units of update_frequency steps: adaptive intervals stay comparable.
        cost = 1.0 if self.cost_metric == "steps" else metrics.get(self.cost_metric)
        ref_now = self.reference["log_loss"]
        reward = interval_reward(
            prev_log_loss,
            self.features["log_loss"],
            step - prev_step,
            self.update_frequency,
            cost=cost,
            cost_weight=self.cost_weight,
            reward_clip=self.reward_clip,
            reference=None if prev_ref is None or ref_now is None else (prev_ref, ref_now),
        )
        if penalty:
            reward = -self.breaker_penalty
        if final:
            reward += self._final_term()
        if self.config.stop_action:
            self.pending[-1]["stop_reward"] = self._stop_reward(
                prev_log_val, prev_log_loss, step - prev_step, cost, "val_loss" in metrics
            )
        self.pending[-1]["reward"] = reward
        if not (self.config.stop_action and not final):
            # With a stop head, _act finalizes after its choice: a stop at this decision must
            # still find this reward pending, to add the final term to it as at a normal end.
            self._finalize(force=False)
        return True

    def _stop_reward(
        self, prev_log_val: float | None, prev_log_loss: float | None, steps: int, cost: Any, has_val: bool
    ) -> float:
        """What continuing over one interval gained: val_weight x the absolute drop of log val_loss
        minus cost_weight x the cost of its steps, clamped. An interval without a ``val_loss`` is
        credited with the drop of the log loss; the next one with a ``val_loss`` gets the val drop
        since the previous ``val_loss`` less those credits, so the intervals between two
        evaluations sum to the val drop between them (decisions between evaluations count it once)."""
        loss_drop = 0.0
        if prev_log_loss is not None and self.features["log_loss"] is not None:
            loss_drop = prev_log_loss - self.features["log_loss"]
        if not has_val:
            drop = loss_drop
            self.stop_credit += loss_drop
        else:
            drop = loss_drop if prev_log_val is None else prev_log_val - self.last_log_val - self.stop_credit
            self.stop_credit = 0.0
        spent = 0.0
        if self.cost_weight > 0.0 and cost is not None:
            spent = self.cost_weight * float(cost) * steps
        return clip(self.val_weight * drop - spent, self.reward_clip)

    def _final_term(self) -> float:
        """``val_weight`` x the log-improvement of ``val_loss`` over the run, or over the paired
        reference's when one is reported (0 without a ``val_loss``)."""
        val, val0 = self.features["val_loss"], self.features["val0"]
        if val is None or val0 is None:
            return 0.0
        log_loss = self._features.log_loss
        ref = self.reference["val_loss"]
        return final_term(
            log_loss(val0), log_loss(val), self.val_weight, self.reward_clip, None if ref is None else log_loss(ref)
        )

    def _end_episode(self, *, final_term_given: bool, last: dict[str, Any] | None = None) -> None:
        """Returns of every pending decision (with the final term), and a last learn/send.
        ``last``: a terminal decision (a stop) appended after the final term is given."""
        if not final_term_given:
            rewarded = [t for t in self.pending if t["reward"] is not None]
            if rewarded:
                rewarded[-1]["reward"] += self._final_term()
        if last is not None:
            self.pending.append(last)
        self._finalize(force=True)
        self._learn_or_send(final=True)
        self.episode_done = True

    def _finalize(self, *, force: bool) -> None:
        """Move decisions whose return is known (``return_horizon`` rewards, or the episode's end) to ``ready``."""
        moved, skipped = finalize(
            self.pending, self.ready, horizon=self.config.return_horizon, gamma=self.config.gamma, force=force
        )
        self.counters["transitions"] += moved
        self.counters["skipped_transitions"] += skipped
        self._learn_or_send(final=False)

    def _learn_or_send(self, *, final: bool) -> None:
        if self.frozen:
            self.ready.clear()
            return
        if self.shared_policy is not None:
            if self.ready and (final or len(self.ready) >= self.segment_size):
                self._send_ready()
            return
        batch = self.config.batch_size
        while len(self.ready) >= batch or (final and len(self.ready) >= 2):
            taken, self.ready = self.ready[:batch], self.ready[batch:]
            self._before_learner_changes()
            self.learner.update(taken)
            self.counters["local_updates"] += 1

    def _act(self, step: int, groups: Sequence[GroupState]) -> list[HParamUpdate]:
        fx = self._features
        global_f = fx.global_features(self.features, step, self.interval)
        if self.per_group:
            if not groups:
                return []
            units = [[g] for g in groups]
            rows = [global_f + fx.group_features(g, self._multiplier(g.index)) for g in groups]
        else:
            units = [list(groups)]
            rows = [global_f + fx.mean_group_features(groups, [self._multiplier(g.index) for g in groups])]
        with single_threaded():
            lr_logp, wd_logp, stop_logp = self.learner.network.act_all_log_probs(rows)
        progress = fx.progress(step)
        stop, logp = None, 0.0
        if stop_logp is not None:
            stop = self._choose_stop(stop_logp[0])  # a run-level choice: read from the first row
            logp = stop_logp[0][stop]
            if stop == 1:
                return self._stop(step, rows, logp, progress, math.exp(stop_logp[0][1]))

        lr_idx, wd_idx = [], []
        for r, unit in enumerate(units):
            i = self._choose(lr_logp[r])
            logp += lr_logp[r][i]
            j = -1
            if wd_logp is not None and any(g.weight_decay is not None for g in unit):
                j = self._choose(wd_logp[r])
                logp += wd_logp[r][j]
            lr_idx.append(i)
            wd_idx.append(j)

        updates = []
        for r, (unit, i, j) in enumerate(zip(units, lr_idx, wd_idx)):
            factor = self.config.lr_actions[i]
            shift = self.config.wd_actions[j] if j >= 0 else None
            if self.frozen_action == "mean":
                factor = self._mean_factor(lr_logp[r])
                if j >= 0:
                    shift = self._mean_shift(wd_logp[r])
            for g in unit:
                updates.extend(self._group_updates(g, factor, shift, progress))
        self.counters["decisions"] += 1
        if not self.frozen:
            transition = self._transition(rows, lr_idx, wd_idx, logp, progress)
            if stop is not None:
                transition["stop"] = 0
            self.pending.append(transition)
        if stop is not None:
            self._finalize(force=False)  # deferred by _observe until the stop was chosen
        self.decision_index += 1
        return updates

    def _transition(
        self, rows: list, lr_idx: list[int], wd_idx: list[int], logp: float, progress: float | None
    ) -> dict[str, Any]:
        return {
            "rows": rows,
            "lr": lr_idx,
            "wd": wd_idx,
            "logp": logp,
            "reward": None,
            "progress": progress,
            "decision": self.decision_index,
            "version": self.learner.version,
        }

    def _choose_stop(self, logp: list[float]) -> int:
        # Two-way, so the greedy/mean readout is "stop when p(stop) > 1/2"; sampled while learning.
        return self._choose(logp)

    def _stop(self, step: int, rows: list, logp: float, progress: float | None, p_stop: float) -> list[HParamUpdate]:
        """The stop action: end the episode here and tell the caller; no lr change."""
        last = None
        if not self.frozen:
            none = [-1] * len(rows)
            last = {**self._transition(rows, none, none, logp, progress), "stop": 1, "reward": 0.0, "stop_reward": 0.0}
        self.decision_index += 1
        self.counters["decisions"] += 1
        self.counters["stops"] += 1
        at = "" if progress is None else f", {progress:.0%} of the run"
        self.stop_reason = f"policy_stop: the RL policy stopped the run at step {step + 1}{at} (p_stop={p_stop:.2f})"
        self._end_episode(final_term_given=False, last=last)
        if self.on_stop is not None:
            self.on_stop(self.stop_reason)
        return []

    def _choose(self, logp: list[float]) -> int:
        if self.frozen_action in ("greedy", "mean"):  # "mean" acts through _mean_factor; this is its logp
            return argmax(logp)
        u = uniform(self.seed, self.draws)
        self.draws += 1
        return sample_index([math.exp(x) for x in logp], u)

    def _moved_from_prior(self, logp: list[float], values: Sequence[float], keep: int) -> float:
        """E_pi[value] - E_prior[value]: how far learning moved a head from its initial prior."""
        expected = sum(math.exp(lp) * v for lp, v in zip(logp, values))
        return expected - _prior_mean(values, keep, self.config.initial_keep_prob)

    def _mean_factor(self, logp: list[float]) -> float:
        """The "mean" readout: the keep action x exp(E_pi[log a] - E_prior[log a]); moves under 1% ignored."""
        keep = self.config.keep_lr_index
        delta = self._moved_from_prior(logp, self._log_lr_actions, keep)
        factor = self.config.lr_actions[keep]
        return factor if abs(delta) < _MEAN_EPS else factor * math.exp(delta)

    def _mean_shift(self, logp: list[float]) -> float:
        """The "mean" readout of the wd head: the keep shift + E_pi[shift] - E_prior[shift]."""
        shifts = self.config.wd_actions
        keep = self.config.keep_wd_index
        delta = self._moved_from_prior(logp, shifts, keep)
        unit = max(abs(a) for a in shifts)
        return shifts[keep] if abs(delta) < _MEAN_EPS * unit else shifts[keep] + delta

    def _group_updates(
        self, g: GroupState, factor: float, shift: float | None, progress: float | None
    ) -> list[HParamUpdate]:
        low, high = self.lr_scale_bounds
        updates = []
        if self.config.action_mode == "anchored":
            return self._anchored_updates(g, factor, shift, progress)
        if self.config.action_mode == "schedule":
            while len(self.scales) <= g.index:
                self.scales.append(1.0)
            scale = min(max(self.scales[g.index] * factor, low), high)
            self.scales[g.index] = scale
            base = self._schedule(progress if progress is not None else 0.0)
            updates.append(
                HParamUpdate(
                    g.index,
                    "lr",
                    g.initial_lr * base * scale,
                    f"rl: schedule x{scale:.4g} (action x{factor:.4g})",
                )
            )
        elif factor != 1.0 and g.lr > 0.0:
            lr = g.lr * factor
            if g.initial_lr > 0.0:
                lr = min(max(lr, g.initial_lr * low), g.initial_lr * high)
            updates.append(HParamUpdate(g.index, "lr", lr, f"rl: lr x{factor:.4g}"))
        if shift is not None and g.weight_decay is not None:
            if shift != 0.0:
                updates.append(
                    HParamUpdate(
                        g.index, "weight_decay", max(g.weight_decay + shift, 0.0), f"rl: wd {shift:+g}"
                    )
                )
        return updates

    def _anchored_updates(
        self, g: GroupState, factor: float, shift: float | None, progress: float | None
    ) -> list[HParamUpdate]:
        """Anchored mode: lr = base x factor ** ramp; weight decay = max(initial + shift, 0)."""
        updates = []
        ramp = 1.0
        if self.anchor_warmup > 0.0 and progress is not None:
            ramp = min(1.0, progress / self.anchor_warmup)
        m = factor**ramp if factor != 1.0 else 1.0
        previous = self._multiplier(g.index)
        base = self._anchored_base(g, progress)
        # Without a named schedule an unchanged multiplier leaves the lr as the base moved it.
        if base is not None and (self._schedule is not None or m != previous):
            lr = base * m
            if lr != g.lr:
                updates.append(HParamUpdate(g.index, "lr", lr, f"rl: base x{m:.4g} (action x{factor:.4g})"))
            self._set_multiplier(g.index, m)
        if shift is not None and g.weight_decay is not None and g.initial_weight_decay is not None:
            wd = max(g.initial_weight_decay + shift, 0.0)
            if wd != g.weight_decay:
                updates.append(HParamUpdate(g.index, "weight_decay", wd, f"rl: wd base {shift:+g}"))
        return updates

    # ---------------------------------------------------------------- end of training
    def finish(
        self, metrics: Mapping[str, float] | None = None, step: int | None = None, *, timeout_s: float = 5.0
    ) -> None:
        """End the episode: reward the last action (from ``metrics`` at ``step``, if given), add the
        final ``val_loss`` term, learn from (or send) what is left, and with a shared policy wait up
        to ``timeout_s`` for the sends to land. Call it once after the training loop.

        Example:
            >>> meta.finish({"loss": last_loss, "val_loss": val_loss}, step=num_steps - 1)
        """
        rewarded = False
        if metrics is not None and not self.episode_done:
            metrics = {k: float(v) for k, v in metrics.items()}
            last = self.features["step"]
            if step is None and last is not None:
                step = last + self.interval
            if "loss" in metrics and step is not None and all(math.isfinite(v) for v in metrics.values()):
                rewarded = self._observe(metrics, step, final=True)
        if not self.episode_done:
            self._end_episode(final_term_given=rewarded)
        if self._client is not None:
            self._client.drain(timeout_s)

    # ---------------------------------------------------------------- shared policy
    def _make_client(self) -> Any:
        from .actor import PolicyClient

        return PolicyClient(
            self.shared_policy,
            self.policy_namespace,
            sync_interval_s=self.sync_interval_s,
            reconnect_interval_s=self.reconnect_interval_s,
        )

    def _sync_shared_policy(self) -> None:
        if self.shared_policy is None:
            return
        if self._client is None:
            self._client = self._make_client()
        update = self._client.poll(self.learner.version)
        if update is None:
            return
        self.config.require_compatible(
            update["signature"],
            f"the shared policy {self.shared_policy!r} was started with",
            "give start_policy_actor(policy_config=...) and the trials the same settings",
        )
        if update.get("weights") is not None:
            self._before_learner_changes()
            self.learner.load_weights(update["weights"])
            self.learner.version = int(update["version"])

    def _send_ready(self) -> None:
        if self._client is None:
            self._client = self._make_client()
        transitions, self.ready = self.ready, []
        self._client.send(transitions)
        self.counters["sent_transitions"] += len(transitions)

    # ---------------------------------------------------------------- observability
    def stats(self) -> dict[str, Any]:
        """Counters and the latest policy metrics, with namespaced keys (for reporting)."""
        out: dict[str, Any] = {
            "policy/version": self.learner.version,
            "policy/updates": self.learner.updates,
            **{f"rl/{k}": v for k, v in self.counters.items()},
            "rl/pending": len(self.pending),
            "rl/ready": len(self.ready),
        }
        for key in (
            "policy/entropy",
            "policy/mean_return",
            "policy/pg_loss",
            "policy/entropy_loss",
            "policy/baseline",
            "policy/stop_pg_loss",
            "policy/stop_prob",
        ):
            if key in self.learner.last_metrics:
                out[key] = self.learner.last_metrics[key]
        if self._client is not None:
            out.update({f"rl/client_{k}": v for k, v in self._client.stats().items()})
        return out

    def __repr__(self) -> str:
        shared = f", shared_policy={self.shared_policy!r}" if self.shared_policy else ""
        return (
            f"RLMetaOptimizer(update_frequency={self.update_frequency}, lr_actions={list(self.config.lr_actions)}, "
            f"wd_actions={self.config.wd_actions and list(self.config.wd_actions)}, "
            f"action_mode={self.config.action_mode!r}, per_group={self.per_group}{shared})"
        )
