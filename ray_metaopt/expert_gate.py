"""Expert/gate strategies for mixture-of-experts models: separate router and expert learning rates
steered by routing statistics.

How a decision works (both classes):

1. **Groups.** Each param group is classified as ``gate``, ``expert`` or ``other``: by its
   ``"role"`` first (``"gate"``/``"router"`` -> gate, ``"expert"`` -> expert, any other non-empty
   role -> other), else by its ``"name"`` against ``expert_groups`` then ``gate_groups`` (regular
   expressions searched in the name, see :func:`~ray_metaopt.moe.compile_patterns`).
   :func:`~ray_metaopt.moe.moe_param_groups` sets the roles. Groups added with
   ``add_param_group`` during training are picked up at the next decision; a group whose role or
   name changed is re-classified there.
2. **Scales.** The strategy keeps one lr *scale* per kind -- gate:
   ``gate_lr_factor * gate_scale``, expert: ``expert_lr_factor * expert_scale`` (the
   specialization bonus of :class:`SmartExpertGateMetaOptimizer`, else 1), other: 1 -- times
   a global ``plateau_scale`` (when ``patience`` is set), and a weight-decay scale for gate groups
   (:class:`SmartExpertGateMetaOptimizer`). The routing criteria move these scales.
3. **Proposals.** For every group whose target scale differs from the scale already applied to
   it, the strategy proposes ``lr * target / applied`` (multiplicative, so a torch LR scheduler
   attached with ``OptimizerWrapper.attach_scheduler`` keeps its shape; see the wrapper). A new
   group therefore starts at ``its own initial lr * its kind's current scale``, and a
   re-classified group moves from its old kind's scale to the new one. A group whose lr is 0 at
   a decision (e.g. a warmup starting at 0) is left alone and catches up at the next decision
   where it is positive; likewise weight-decay changes only touch groups with weight decay > 0,
   so no-decay groups stay at 0.

``expert_lr_factor`` is applied before the first optimizer step: the first
``update_hyperparameters`` call always decides (only the factors; the routing criteria wait for the
first scheduled decision at step ``update_frequency - 1``). ``gate_lr_factor`` waits for
``gate_settle_steps`` (default: until the first full ``metric_window``, 49 steps when deciding every
step; 0, so also before the first optimizer step, with ``metric_window=1``): until then gate groups
keep the lr they were built with (times the routing criteria's gate scale). The factors multiply
the lr each group was built with, so do not also scale those lrs in the groups (e.g.
``moe_param_groups(gate_lr=...)``) unless you want both.

Smoothing: the routing criteria read the mean of each routing metric over the last
``metric_window`` decisions where it was given (default :func:`default_metric_window`: about 50
steps of data, so one decision per step averages 50 batches and one decision per 50 or more steps
reads the value as given). The provided Tune trainable passes ``metric_window=1``: it decides at
evaluations, where its criteria keep the values as reported.

Missing metrics: a routing criterion whose metric is absent at a decision is skipped for that
decision (its scale and reference values stay as they are); the other criteria and the
loss-based plateau rule still run (the plateau rule, when enabled, needs its ``monitor`` metric at
every scheduled decision and raises ``KeyError`` without it, like ``PlateauMetaOptimizer``).
Non-finite metrics skip the whole decision (base class / wrapper: the skip is recorded in
``OptimizerWrapper.log.skipped``) and the decision is retried at the next step.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from ._validation import check_int, check_range
from .base import GroupState, HParamUpdate, MetaOptimizer
from .moe import PatternSpec, compile_patterns, matches_any
from .plateau_tracker import count_decision, strict_is_better

__all__ = ["ExpertGateMetaOptimizer", "SmartExpertGateMetaOptimizer"]

GATE, EXPERT, OTHER = "gate", "expert", "other"
_GATE_ROLES = ("gate", "router")
_EXPERT_ROLES = ("expert",)

# Bookkeeping of what was applied to the optimizer; survives reset() (see reset()).
_BOOKKEEPING = ("initialised", "group_kinds", "applied_lr", "applied_wd")

# The routing metrics the criteria read; each is averaged over the last ``metric_window`` decisions.
ROUTING_METRICS = ("routing_entropy", "routing_sparsity", "load_violation", "expert_specialization")
SMOOTHING_STEPS = 50


def default_metric_window(update_frequency: int) -> int:
    """Decisions averaged by the routing criteria: ``ceil(50 / update_frequency)`` (1 from 50 steps on).

    Per-batch routing statistics of a 32-token batch move by several hundredths from one step to
    the next, the size of ``specialization_tolerance``; about 50 steps of data per mean keep the
    criteria from reacting to that (``benchmarks/seed_usage.py``, development seeds).
    """
    return max(1, math.ceil(SMOOTHING_STEPS / update_frequency))


def _positive(name: str, value: Any) -> float:
    return check_range(name, value, 0.0, math.inf, low_open=True, high_open=True)


def _optional(check, name: str, value: Any, *args: Any, **kwargs: Any) -> Any:
    return None if value is None else check(name, value, *args, **kwargs)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


class ExpertGateMetaOptimizer(MetaOptimizer):
    """Separate gate (router) and expert learning rates; the gate lr follows the routing entropy.

    Entropy rule (``routing_entropy``, normalised to [0, 1], e.g. from
    :func:`~ray_metaopt.routing_metrics`), at each decision:

    - ``routing_entropy < entropy_threshold``: the router is collapsing onto a few experts per
      token (exploitation). The gate lr is *raised* by ``1 + adjustment_rate``: softmax
      gradients shrink as ``p (1 - p)`` when the router saturates, so a collapsing router needs
      larger steps for the task gradient (and any balancing loss) to move tokens to other
      experts -- exploration -- before the collapse becomes permanent.
    - ``routing_entropy > entropy_threshold + entropy_band``: the router spreads tokens almost
      uniformly (exploring). The gate lr is *lowered* by ``1 / (1 + adjustment_rate)`` so the
      assignment settles and experts can specialise on a stable token distribution instead of
      chasing a churning router.
    - in between: no change (a dead band, so the lr does not oscillate). With
      ``entropy_threshold + entropy_band >= 1`` the lr is never lowered.

    The defaults (raise below 0.3, lower above 0.95) act only on a saturated router and on a
    near-uniform one: a trained top-1 router with 4-8 experts typically sits around 0.3-0.6.
    Per-token entropy does not see load imbalance (every token may confidently pick the same
    expert); :class:`SmartExpertGateMetaOptimizer` also reads ``load_violation``.

    The resulting ``gate_scale`` is bounded to ``[min_gate_scale, max_gate_scale]``, relative to
    ``gate_lr_factor * initial lr``; the wrapper also clamps to ``min_lr``/``max_lr``.

    Plateau rule (optional, ``patience`` not ``None``): ``torch.optim.lr_scheduler.ReduceLROnPlateau``'s
    rule on ``monitor``, counted in decisions: after more than ``patience`` decisions without a
    relative improvement of ``plateau_threshold``, every group's lr (gate, expert and other) is
    multiplied by ``plateau_factor``, then ``cooldown`` decisions pass without counting. When set,
    ``monitor`` must be in the metrics at every scheduled decision (``KeyError`` otherwise).

    See the module documentation for how groups are found, how changes are proposed, and what
    happens with missing or non-finite metrics.

    Args:
        gate_lr_factor: gate groups' lr relative to their initial lr (> 0). Default 1.0 (it was
            0.1): in a plain per-step loop on ``TinyMoE`` a 10x lower router lr alone ended at
            x1.05-x1.94 the unwrapped optimizer's final loss (``benchmarks/seed_usage.py``,
            development seeds), and the entropy rule did not win it back. Pass 0.1 (the seed's
            ``SmartExpertGateMetaOptimizer`` call does) for a deliberately slow router; it applies
            from ``gate_settle_steps`` on.
        expert_lr_factor: expert groups' lr relative to their initial lr (> 0).
        entropy_threshold: routing entropy below which the gate lr is raised, in [0, 1].
        entropy_band: width of the no-change band above ``entropy_threshold``; above
            ``entropy_threshold + entropy_band`` the gate lr is lowered, in [0, 1].
        adjustment_rate: relative change of a scale per decision and criterion (> 0): scales are
            multiplied by ``1 + adjustment_rate`` or divided by it.
        min_gate_scale: lower bound of the entropy-driven gate scale, in (0, 1].
        max_gate_scale: upper bound of the entropy-driven gate scale (>= 1).
        gate_groups: name patterns of gate groups without a role.
        expert_groups: name patterns of expert groups without a role (checked first).
        patience: plateau rule patience in decisions (>= 0), or ``None`` to disable it.
        plateau_factor: lr multiplier of a plateau cut, in (0, 1).
        plateau_threshold: relative improvement that resets the plateau count (>= 0).
        cooldown: decisions after a cut that are not counted (>= 0).
        monitor: the metric the plateau rule watches.
        collapse_load: when ``load_violation`` is in the metrics, low entropy raises the gate lr
            only while ``load_violation > collapse_load`` (>= 0): confident routing spread over
            the experts is specialization, not collapse. Default 2.0, the busiest expert taking
            more than 3x the mean load (it was 1.0, 2x the mean, which a specializing top-1
            router on 4 experts reaches by routing two clusters to one expert: the gate lr went
            to ``max_gate_scale`` on 9 of 10 healthy development runs of
            ``benchmarks/seed_usage.py``). ``None``: entropy alone decides.
        metric_window: decisions over which each routing metric is averaged before the criteria
            read it (>= 1), or ``None`` for :func:`default_metric_window` of ``update_frequency``.
        gate_settle_steps: steps during which gate groups keep the lr they were built with before
            ``gate_lr_factor`` applies (>= 0); the factor applies at the first decision at or after
            this step. ``None`` (default): ``(metric_window - 1) * update_frequency``, the steps
            before the routing metrics' window is first full: 49 when deciding every step with the
            default window, 0 with ``metric_window=1`` (the provided Tune trainable, whose
            decisions are unchanged) or ``update_frequency >= 50``. It was 0 for every setting: a
            router slowed from step 0 (the seed's ``SmartExpertGateMetaOptimizer(gate_lr_factor=0.1,
            ...)``) keeps its random initial assignment while the experts specialise on it; in
            ``benchmarks/seed_usage.py``'s per-step ``moe`` loop (40 development seeds) that call
            ended above x1.02 the unwrapped optimizer's loss on 11 seeds (worst x1.32, median
            x0.88); letting the router settle first, on 5 (worst x1.13, median x0.81). A slower
            router is meant to let experts specialise on a stable assignment (see the entropy rule),
            which presupposes that an assignment has formed. Pass 0 for the old behaviour.
        **base: the :class:`~ray_metaopt.MetaOptimizer` arguments, by keyword: ``update_frequency``
            (default 1), ``min_lr``, ``max_lr``, ``max_weight_decay``, ``adaptive_frequency``.

    Raises:
        ValueError: at wrapper construction, when no param group is a gate group.

    Example:
        >>> model = TinyMoE(16, 32, 4, num_experts=4, top_k=1)
        >>> opt = OptimizerWrapper(torch.optim.AdamW(moe_param_groups(model, lr=1e-3)),
        ...                        ExpertGateMetaOptimizer(gate_lr_factor=0.1, entropy_threshold=0.5))
        >>> out, logits = model(x)
        >>> metrics = {"loss": loss.detach(), **routing_metrics(logits, as_tensors=True)}
        >>> opt.update_hyperparameters(metrics); opt.step()
    """

    _state_attrs = _BOOKKEEPING + (
        "gate_scale",
        "plateau_scale",
        "best",
        "num_bad_decisions",
        "cooldown_counter",
        "routing_recent",
        "gate_factor_on",
    )

    def __init__(
        self,
        gate_lr_factor: float = 1.0,
        expert_lr_factor: float = 1.0,
        entropy_threshold: float = 0.3,
        *,
        entropy_band: float = 0.65,
        adjustment_rate: float = 0.1,
        min_gate_scale: float = 0.25,
        max_gate_scale: float = 4.0,
        gate_groups: PatternSpec = ("gate", "router"),
        expert_groups: PatternSpec = ("expert",),
        patience: int | None = None,
        plateau_factor: float = 0.5,
        plateau_threshold: float = 1e-4,
        cooldown: int = 0,
        monitor: str = "loss",
        collapse_load: float | None = 2.0,
        metric_window: int | None = None,
        gate_settle_steps: int | None = None,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        self.gate_lr_factor = _positive("gate_lr_factor", gate_lr_factor)
        self.expert_lr_factor = _positive("expert_lr_factor", expert_lr_factor)
        self.entropy_threshold = check_range("entropy_threshold", entropy_threshold, 0.0, 1.0)
        self.entropy_band = check_range("entropy_band", entropy_band, 0.0, 1.0)
        self.adjustment_rate = _positive("adjustment_rate", adjustment_rate)
        self.min_gate_scale = check_range("min_gate_scale", min_gate_scale, 0.0, 1.0, low_open=True)
        self.max_gate_scale = check_range("max_gate_scale", max_gate_scale, 1.0, math.inf, high_open=True)
        self.gate_groups = compile_patterns("gate_groups", gate_groups)
        self.expert_groups = compile_patterns("expert_groups", expert_groups)
        self.patience = _optional(check_int, "patience", patience, minimum=0)
        self.plateau_factor = check_range(
            "plateau_factor", plateau_factor, 0.0, 1.0, low_open=True, high_open=True
        )
        self.plateau_threshold = check_range(
            "plateau_threshold", plateau_threshold, 0.0, math.inf, high_open=True
        )
        self.cooldown = check_int("cooldown", cooldown, minimum=0)
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"monitor must be a metric name (non-empty str), got monitor={monitor!r}")
        self.monitor = monitor
        self.collapse_load = _optional(
            check_range, "collapse_load", collapse_load, 0.0, math.inf, high_open=True
        )
        if metric_window is None:
            metric_window = default_metric_window(self.update_frequency)
        self.metric_window = check_int("metric_window", metric_window, minimum=1)
        if gate_settle_steps is None:
            gate_settle_steps = (self.metric_window - 1) * self.update_frequency
        self.gate_settle_steps = check_int("gate_settle_steps", gate_settle_steps, minimum=0)
        self.reset()

    # ----------------------------------------------------------------- state
    def _init_state(self) -> None:
        self.initialised = False
        self.group_kinds: list[str | None] = []
        self.applied_lr: list[float] = []
        self.applied_wd: list[float] = []
        self.gate_scale = 1.0
        self.plateau_scale = 1.0
        self.best = math.inf
        self.num_bad_decisions = 0
        self.cooldown_counter = 0
        self.routing_recent: dict[str, list[float]] = {}
        self.gate_factor_on = False

    def reset(self) -> None:
        """Forget what was learned from metrics: scales return to 1 and the plateau count restarts.

        The record of which scale was applied to which param group is kept, so the next decision
        brings every group back to ``initial lr * factor`` instead of applying the factors twice.
        Build a new strategy to use it with another optimizer.
        """
        kept = {attr: getattr(self, attr) for attr in _BOOKKEEPING if hasattr(self, attr)}
        super().reset()
        for attr, value in kept.items():
            setattr(self, attr, value)
        self._reset_schedule()

    # ----------------------------------------------------------------- groups
    def classify(self, group: GroupState) -> str:
        """``"gate"``, ``"expert"`` or ``"other"`` for one param group (role first, then name)."""
        if group.role:
            if group.role in _GATE_ROLES:
                return GATE
            if group.role in _EXPERT_ROLES:
                return EXPERT
            return OTHER
        if matches_any(group.name, self.expert_groups):
            return EXPERT
        if matches_any(group.name, self.gate_groups):
            return GATE
        return OTHER

    def check_groups(self, groups: Sequence[GroupState]) -> None:
        super().check_groups(groups)
        if not any(self.classify(g) == GATE for g in groups):
            found = [(g.index, g.name, g.role) for g in groups]
            raise ValueError(
                f"{type(self).__name__} found no gate (router) param group: give the router's group "
                f"role='gate' (moe_param_groups does) or a name matching "
                f"gate_groups={[p.pattern for p in self.gate_groups]}; got groups (index, name, role) {found}"
            )

    def _track_groups(self, groups: Sequence[GroupState]) -> dict[int, str]:
        """Record new groups and role changes; returns a note per affected group index."""
        notes = {}
        for g in sorted(groups, key=lambda s: s.index):
            kind = self.classify(g)
            while len(self.group_kinds) <= g.index:
                self.group_kinds.append(None)
                self.applied_lr.append(1.0)
                self.applied_wd.append(1.0)
            old = self.group_kinds[g.index]
            if old is None:
                notes[g.index] = f"new {kind} group"
            elif old != kind:
                notes[g.index] = f"re-classified {old} -> {kind}"
            self.group_kinds[g.index] = kind
        return notes

    # ----------------------------------------------------------------- scales
    def lr_scale(self, kind: str) -> float:
        """The lr multiplier (relative to a group's initial lr) this strategy wants for ``kind``."""
        if kind == GATE:
            factor = self.gate_lr_factor if self.gate_factor_on else 1.0
            return factor * self.gate_scale * self.plateau_scale
        if kind == EXPERT:
            return self.expert_lr_factor * self._expert_scale() * self.plateau_scale
        return self.plateau_scale

    def weight_decay_scale(self, kind: str) -> float:
        """The weight-decay multiplier (relative to a group's initial value) wanted for ``kind``."""
        return self._gate_wd_scale() if kind == GATE else 1.0

    def _expert_scale(self) -> float:
        return 1.0

    def _gate_wd_scale(self) -> float:
        return 1.0

    def _step_scale(self, value: float, direction: int, low: float, high: float) -> float:
        return min(max(value * (1.0 + self.adjustment_rate) ** direction, low), high)

    # ----------------------------------------------------------------- deciding
    def _reset_schedule(self) -> None:
        super()._reset_schedule()
        if not getattr(self, "initialised", False):
            # The very first call decides, to apply the lr factors before the first optimizer step.
            # Kept in the schedule fields so that wrappers which copy the schedule (distributed
            # ranks) agree on when a decision is due.
            self.next_update_step = 0

    def update_hparams(
        self, metrics: Mapping[str, float], step: int, groups: Sequence[GroupState] = ()
    ) -> list[HParamUpdate]:
        if not self.initialised and self.last_update_step is None and step < self.update_frequency - 1:
            # First call, before the first scheduled decision: apply the factors only; the criteria
            # wait for the regular schedule.
            self.initialised = True
            self.next_update_step = self.update_frequency - 1
            self._settle(step)
            return self._proposals(groups, self._track_groups(groups), {})
        return super().update_hparams(metrics, step, groups)

    def decide(
        self, metrics: Mapping[str, float], step: int, groups: Sequence[GroupState]
    ) -> list[HParamUpdate]:
        self.initialised = True
        notes = self._track_groups(groups)
        reasons: dict[str, list[str]] = {GATE: [], EXPERT: [], "all": [], "gate_wd": []}
        if self._settle(step) and self.gate_lr_factor != 1.0:
            reasons[GATE].append(
                f"step {step} >= gate_settle_steps={self.gate_settle_steps}: "
                f"gate_lr_factor={_fmt(self.gate_lr_factor)} applies"
            )
        self._update_scales(self._smoothed(metrics), step, reasons)
        return self._proposals(groups, notes, reasons)

    def _settle(self, step: int) -> bool:
        """Turn ``gate_lr_factor`` on once ``step >= gate_settle_steps``; True when it just turned on."""
        if self.gate_factor_on or step < self.gate_settle_steps:
            return False
        self.gate_factor_on = True
        return True

    def _smoothed(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """``metrics`` with each routing metric replaced by its mean over the last ``metric_window``."""
        smoothed = dict(metrics)
        for key in ROUTING_METRICS:
            if key in metrics:
                recent = self.routing_recent.setdefault(key, [])
                recent.append(float(metrics[key]))
                del recent[: -self.metric_window]
                smoothed[key] = sum(recent) / len(recent)
        return smoothed

    def _gate_votes(self, metrics: Mapping[str, float]) -> list[tuple[int, str]]:
        """(+1 raise / -1 lower, reason) for the gate scale; absent metrics give no vote."""
        entropy = metrics.get("routing_entropy")
        if entropy is None:
            return []
        load = metrics.get("load_violation")
        if entropy < self.entropy_threshold and (
            self.collapse_load is None or load is None or load > self.collapse_load
        ):
            return [
                (1, f"routing_entropy={_fmt(entropy)} < entropy_threshold={_fmt(self.entropy_threshold)}: "
                    "raise gate lr (collapsing router, explore)")
            ]
        high = self.entropy_threshold + self.entropy_band
        if entropy > high:
            return [
                (-1, f"routing_entropy={_fmt(entropy)} > {_fmt(high)}: "
                     "lower gate lr (diffuse router, settle)")
            ]
        return []

    def _update_scales(self, metrics: Mapping[str, float], step: int, reasons: dict[str, list[str]]) -> None:
        votes = self._gate_votes(metrics)
        if votes:
            new = self._step_scale(
                self.gate_scale, sum(v for v, _ in votes), self.min_gate_scale, self.max_gate_scale
            )
            if new != self.gate_scale:
                self.gate_scale = new
                reasons[GATE].extend(r for v, r in votes if v)
        if self.patience is not None:
            self._plateau(metrics, step, reasons)

    def _plateau(self, metrics: Mapping[str, float], step: int, reasons: dict[str, list[str]]) -> None:
        if self.monitor not in metrics:
            raise KeyError(
                f"{type(self).__name__} monitors {self.monitor!r} (patience={self.patience}) but the "
                f"metrics at step {step} are {sorted(metrics)}"
            )
        current = metrics[self.monitor]
        improved = strict_is_better(current, self.best, self.plateau_threshold, "rel", "min")
        if improved:
            self.best = current
        self.num_bad_decisions, self.cooldown_counter = count_decision(
            improved, self.num_bad_decisions, self.cooldown_counter
        )
        if self.num_bad_decisions > self.patience:
            self.plateau_scale *= self.plateau_factor
            reasons["all"].append(
                f"plateau: {self.monitor} not improved for {self.num_bad_decisions} decisions "
                f"(best {_fmt(self.best)}): lr x{_fmt(self.plateau_factor)}"
            )
            self.cooldown_counter = self.cooldown
            self.num_bad_decisions = 0

    def _proposals(
        self, groups: Sequence[GroupState], notes: Mapping[int, str], reasons: Mapping[str, list[str]]
    ) -> list[HParamUpdate]:
        updates = []
        for g in groups:
            kind = self.group_kinds[g.index]
            note = [notes[g.index]] if g.index in notes else []
            target = self.lr_scale(kind)
            applied = self.applied_lr[g.index]
            if target != applied and g.lr > 0:
                why = note + list(reasons.get(kind, ())) + list(reasons.get("all", ()))
                why.append(f"{kind} lr scale {_fmt(applied)} -> {_fmt(target)} of initial lr")
                updates.append(HParamUpdate(g.index, "lr", g.lr * (target / applied), "; ".join(why)))
                self.applied_lr[g.index] = target
            target_wd = self.weight_decay_scale(kind)
            applied_wd = self.applied_wd[g.index]
            if target_wd != applied_wd and g.weight_decay is not None and g.weight_decay > 0:
                why = note + (list(reasons.get("gate_wd", ())) if kind == GATE else [])
                why.append(f"{kind} weight decay scale {_fmt(applied_wd)} -> {_fmt(target_wd)} of initial")
                value = g.weight_decay * (target_wd / applied_wd)
                updates.append(HParamUpdate(g.index, "weight_decay", value, "; ".join(why)))
                self.applied_wd[g.index] = target_wd
        return updates

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(gate_lr_factor={self.gate_lr_factor}, "
            f"expert_lr_factor={self.expert_lr_factor}, entropy_threshold={self.entropy_threshold}, "
            f"metric_window={self.metric_window}, update_frequency={self.update_frequency})"
        )


class SmartExpertGateMetaOptimizer(ExpertGateMetaOptimizer):
    """:class:`ExpertGateMetaOptimizer` plus sparsity, specialization and load-balance criteria.

    On top of the entropy rule (and the optional plateau rule), at each decision:

    - **Sparsity target** (``routing_sparsity``): the gate groups' *weight decay* steers
      sparsity, leaving the gate lr to the entropy rule (the two would otherwise pull the same
      knob in opposite directions, since sparse routing is also low-entropy routing). Weight decay
      shrinks router weights and so router logits towards uniform routing. Sparsity below
      ``sparsity_target - sparsity_tolerance`` divides the gate weight-decay scale by
      ``1 + adjustment_rate`` (logits may grow, routing gets sparser); above
      ``sparsity_target + sparsity_tolerance`` multiplies it. The scale is bounded to
      ``[min_gate_wd_scale, max_gate_wd_scale]`` (and ``max_weight_decay``). Gate groups with
      weight decay 0 (``gate_no_decay``) are not touched, so give the router weight decay
      (``moe_param_groups`` does) for this criterion to act.
    - **Specialization** (``expert_specialization``): when it has risen by more than
      ``specialization_tolerance`` since the last change, expert groups get
      ``specialization_bonus`` times their lr (the expert scale is capped at
      ``max_expert_scale``): the router now sends each expert a consistent share of the data, so
      larger expert steps are safe and speed up specialization. When it has fallen by more
      than the tolerance, one bonus is withdrawn (never below the base ``expert_lr_factor``).
      The first value seen is the reference.
    - **Load balance** (``load_violation``): above ``load_threshold`` the gate lr gets one more
      ``1 + adjustment_rate`` raise in the same decision, the same exploration response as for
      low entropy: an overloaded expert means the router has collapsed onto it, and larger router
      steps move tokens off it sooner. Votes combine: low entropy plus overload raise twice;
      high entropy plus overload cancel.

    Each criterion is skipped at a decision where its metric is missing; ``None`` (or
    ``specialization_bonus=1``) turns it off.

    ``gate_lr_factor`` waits for ``gate_settle_steps`` (see :class:`ExpertGateMetaOptimizer`): with
    the seed's call below, deciding every step, the router trains at the lr it was built with for
    its first 49 steps, then at 0.1x (times the gate scale of the entropy and load rules).
    Measured in ``benchmarks/seed_usage.py`` (``benchmarks/RESULTS-seed-usage.md``): the seed's call
    in a per-step ``moe`` loop, most of the gain comes from the specialization bonus (the expert lr
    reaches ``max_expert_scale`` within 100-300 steps), the load rule raises the gate scale to its
    cap (4x) on most runs, the sparsity rule lowers the gate weight decay to its floor without a
    measurable effect, and the entropy rule (threshold 0.8 under ``collapse_load=2``) did not fire
    on development seeds 0-9.

    Args:
        gate_lr_factor, expert_lr_factor, entropy_threshold: see :class:`ExpertGateMetaOptimizer`.
        sparsity_target: wanted ``routing_sparsity`` in [0, 1], or ``None``.
        specialization_bonus: expert lr multiplier per specialization rise (>= 1).
        sparsity_tolerance: half-width of the no-change band around ``sparsity_target``, in [0, 1).
        min_gate_wd_scale: lower bound of the gate weight-decay scale, in (0, 1].
        max_gate_wd_scale: upper bound of the gate weight-decay scale (>= 1).
        specialization_tolerance: change of ``expert_specialization`` that counts, in [0, 1].
        max_expert_scale: cap of the specialization scale on expert lrs (>= 1).
        load_threshold: ``load_violation`` above which the gate lr is raised (>= 0), or ``None``.
        **kwargs: every other :class:`ExpertGateMetaOptimizer` argument (``entropy_band``,
            ``adjustment_rate``, gate-scale bounds, group patterns, plateau rule,
            ``update_frequency``, bounds, ``adaptive_frequency``).

    Example:
        >>> meta = SmartExpertGateMetaOptimizer(gate_lr_factor=0.1, expert_lr_factor=1.0,
        ...     entropy_threshold=0.8, sparsity_target=0.7, specialization_bonus=1.2)
        >>> opt = OptimizerWrapper(torch.optim.AdamW(moe_param_groups(model)), meta)
    """

    _state_attrs = ExpertGateMetaOptimizer._state_attrs + (
        "gate_wd_scale",
        "expert_scale",
        "specialization_ref",
    )

    def __init__(
        self,
        gate_lr_factor: float = 1.0,
        expert_lr_factor: float = 1.0,
        entropy_threshold: float = 0.3,
        sparsity_target: float | None = 0.7,
        specialization_bonus: float = 1.2,
        *,
        sparsity_tolerance: float = 0.05,
        min_gate_wd_scale: float = 0.1,
        max_gate_wd_scale: float = 10.0,
        specialization_tolerance: float = 0.02,
        max_expert_scale: float = 2.0,
        load_threshold: float | None = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(gate_lr_factor, expert_lr_factor, entropy_threshold, **kwargs)
        self.sparsity_target = _optional(check_range, "sparsity_target", sparsity_target, 0.0, 1.0)
        self.specialization_bonus = check_range(
            "specialization_bonus", specialization_bonus, 1.0, math.inf, high_open=True
        )
        self.sparsity_tolerance = check_range(
            "sparsity_tolerance", sparsity_tolerance, 0.0, 1.0, high_open=True
        )
        self.min_gate_wd_scale = check_range("min_gate_wd_scale", min_gate_wd_scale, 0.0, 1.0, low_open=True)
        self.max_gate_wd_scale = check_range(
            "max_gate_wd_scale", max_gate_wd_scale, 1.0, math.inf, high_open=True
        )
        self.specialization_tolerance = check_range(
            "specialization_tolerance", specialization_tolerance, 0.0, 1.0
        )
        self.max_expert_scale = check_range(
            "max_expert_scale", max_expert_scale, 1.0, math.inf, high_open=True
        )
        self.load_threshold = _optional(
            check_range, "load_threshold", load_threshold, 0.0, math.inf, high_open=True
        )
        self.reset()

    def _init_state(self) -> None:
        super()._init_state()
        self.gate_wd_scale = 1.0
        self.expert_scale = 1.0
        self.specialization_ref: float | None = None

    def _expert_scale(self) -> float:
        return self.expert_scale

    def _gate_wd_scale(self) -> float:
        return self.gate_wd_scale

    def _gate_votes(self, metrics: Mapping[str, float]) -> list[tuple[int, str]]:
        votes = super()._gate_votes(metrics)
        load = metrics.get("load_violation")
        if self.load_threshold is not None and load is not None and load > self.load_threshold:
            votes.append((1, f"load_violation={_fmt(load)} > load_threshold={_fmt(self.load_threshold)}: "
                             "raise gate lr (re-spread tokens)"))
        return votes

    def _update_scales(self, metrics: Mapping[str, float], step: int, reasons: dict[str, list[str]]) -> None:
        super()._update_scales(metrics, step, reasons)
        sparsity = metrics.get("routing_sparsity")
        if self.sparsity_target is not None and sparsity is not None:
            direction = 0
            if sparsity < self.sparsity_target - self.sparsity_tolerance:
                direction, what = -1, "below"
            elif sparsity > self.sparsity_target + self.sparsity_tolerance:
                direction, what = 1, "above"
            if direction:
                new = self._step_scale(
                    self.gate_wd_scale, direction, self.min_gate_wd_scale, self.max_gate_wd_scale
                )
                if new != self.gate_wd_scale:
                    self.gate_wd_scale = new
                    reasons["gate_wd"].append(
                        f"routing_sparsity={_fmt(sparsity)} {what} "
                        f"sparsity_target={_fmt(self.sparsity_target)}: "
                        f"gate weight decay {'lowered' if direction < 0 else 'raised'}"
                    )
        spec = metrics.get("expert_specialization")
        if self.specialization_bonus > 1.0 and spec is not None:
            ref = self.specialization_ref
            if ref is None:
                self.specialization_ref = spec
            elif spec > ref + self.specialization_tolerance:
                self.specialization_ref = spec
                new = min(self.expert_scale * self.specialization_bonus, self.max_expert_scale)
                if new != self.expert_scale:
                    self.expert_scale = new
                    reasons[EXPERT].append(
                        f"expert_specialization rose {_fmt(ref)} -> {_fmt(spec)}: expert lr "
                        f"x{_fmt(self.specialization_bonus)} (bonus scale {_fmt(new)})"
                    )
            elif spec < ref - self.specialization_tolerance:
                self.specialization_ref = spec
                new = max(self.expert_scale / self.specialization_bonus, 1.0)
                if new != self.expert_scale:
                    self.expert_scale = new
                    reasons[EXPERT].append(
                        f"expert_specialization fell {_fmt(ref)} -> {_fmt(spec)}: expert bonus withdrawn "
                        f"(bonus scale {_fmt(new)})"
                    )
