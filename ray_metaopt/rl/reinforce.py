"""REINFORCE with a baseline and an entropy bonus: the one update rule, and the learner that owns it.

A *transition* is one decision, as plain data (it travels through Ray and checkpoints)::

    {"rows": [[float] * STATE_DIM, ...],  # one state row per acting unit (1, or one per param group)
     "lr": [int, ...],                     # lr action index per row, -1 = none (a stop decision)
     "wd": [int, ...],                     # weight-decay action index per row, -1 = none
     "logp": float,                        # log-probability of all of it under the acting policy
     "ret": float,                         # discounted return of the decision
     "progress": float | None,             # fraction of the run done (None: unknown)
     "decision": int,                      # decision index in the episode
     "version": int}                       # policy version that acted

A policy with a stop head (``PolicyConfig.stop_action``) adds ``"stop": 0 | 1`` (continue / stop,
read from the decision's first row) and ``"stop_ret"``: the return of that choice, the
*absolute* (unpaired) log-``val_loss`` drop over the following intervals minus their cost,
undiscounted, 0 for a stop. It has its own advantage: stopping gives up the improvement every
continued run gets, which a paired return (relative to the base schedule) does not contain. Its
baseline is exactly 0, the known value of stopping, so every continued decision's return *is*
its advantage over stopping there, and a stop decision teaches nothing (its advantage is 0); a
baseline of the mean return would leave only the rare sampled stops to learn from, mostly early
ones, and the head learns never to stop.

The policy gradient is ``-(w * A * log pi(a|s))`` with ``A = (return - baseline)`` (optionally
standardised in the batch) and ``w = min(pi(a|s) / mu(a|s), importance_clip)``, the
clipped importance weight of a transition produced by an older policy ``mu``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._validation import check_int, check_range
from .policy import PolicyConfig, PolicyNetwork


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the policy's tiny tensor ops on one thread.

    On a busy machine, waking torch's intra-op thread pool for 32x32 matrices costs milliseconds
    (measured: a 32-transition update took 175 ms with 2 threads under load, 6 ms with 1), and
    the training loop's threads are what we must not disturb. The setting is restored after.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class Batch:
    """Transitions as tensors: ``rows`` are flattened, ``row_index`` maps each row to its transition."""

    states: torch.Tensor  # [R, state_dim]
    lr_actions: torch.Tensor  # [R]
    wd_actions: torch.Tensor  # [R], -1 = no weight-decay action
    row_index: torch.Tensor  # [R]
    behaviour_logp: torch.Tensor  # [N]
    returns: torch.Tensor  # [N]
    first_row: torch.Tensor | None = None  # [N], the row the stop head reads (None: no stop head)
    stop_actions: torch.Tensor | None = None  # [N], 0 continue / 1 stop
    stop_returns: torch.Tensor | None = None  # [N]

    def acting(self) -> torch.Tensor:
        """[N] bool: the transitions that took an lr/wd action (all but stops)."""
        if self.stop_actions is None:
            return torch.ones(self.returns.shape[0], dtype=torch.bool)
        return self.stop_actions != 1

    @classmethod
    def from_transitions(cls, transitions: Sequence[Mapping[str, Any]]) -> Batch:
        rows, lr, wd, index, first = [], [], [], [], []
        for i, t in enumerate(transitions):
            first.append(len(rows))
            rows.extend(t["rows"])
            lr.extend(t["lr"])
            wd.extend(t["wd"])
            index.extend([i] * len(t["rows"]))
        stop = all("stop" in t for t in transitions) and bool(transitions)
        return cls(
            states=torch.tensor(rows, dtype=torch.float32),
            lr_actions=torch.tensor(lr, dtype=torch.long),
            wd_actions=torch.tensor(wd, dtype=torch.long),
            row_index=torch.tensor(index, dtype=torch.long),
            behaviour_logp=torch.tensor([t["logp"] for t in transitions], dtype=torch.float32),
            returns=torch.tensor([t["ret"] for t in transitions], dtype=torch.float32),
            first_row=torch.tensor(first, dtype=torch.long) if stop else None,
            stop_actions=torch.tensor([int(t["stop"]) for t in transitions], dtype=torch.long) if stop else None,
            stop_returns=torch.tensor([float(t["stop_ret"]) for t in transitions], dtype=torch.float32)
            if stop
            else None,
        )


def invalid_transition(t: Any, config: PolicyConfig) -> str | None:
    """Why ``t`` is not a usable transition for a policy of ``config`` (``None`` when it is)."""
    try:
        rows, lr, wd = t["rows"], t["lr"], t["wd"]
        if not rows or len(lr) != len(rows) or len(wd) != len(rows):
            return "rows/lr/wd lengths differ or are empty"
        for row in rows:
            if len(row) != config.state_dim:
                return f"state row has {len(row)} features, the policy expects {config.state_dim}"
            if not all(math.isfinite(x) for x in row):
                return "non-finite state feature"
        stop = t.get("stop")
        if config.stop_action:
            if type(stop) is not int or stop not in (0, 1):
                return f"a policy with a stop head needs stop=0 or 1, got stop={stop!r}"
            if not math.isfinite(float(t["stop_ret"])):
                return f"non-finite stop_ret={t['stop_ret']!r}"
        elif stop is not None:
            return "stop action for a policy without a stop head"
        if stop == 1:
            if any(a != -1 for a in lr) or any(a != -1 for a in wd):
                return f"a stop decision takes no lr or weight-decay action, got lr={lr!r}, wd={wd!r}"
        elif not all(0 <= a < config.num_lr_actions for a in lr):
            return "lr action index out of range"
        if not all(-1 <= a < config.num_wd_actions for a in wd):
            return "weight-decay action index out of range"
        for key in ("ret", "logp"):
            if not math.isfinite(float(t[key])):
                return f"non-finite {key}={t[key]!r}"
        int(t["version"])
    except (KeyError, TypeError, ValueError) as e:
        return f"malformed transition ({type(e).__name__}: {e})"
    return None


def phase_bucket(progress: float | None, decision: int, num_buckets: int) -> str:
    """Which baseline bucket a decision belongs to: by progress when known, else by log2(decision)."""
    if num_buckets == 1:
        return "all"
    if progress is not None:
        return f"p{min(int(progress * num_buckets), num_buckets - 1)}"
    return f"d{min(int(math.log2(1 + decision)), num_buckets - 1)}"


def compute_baseline(
    returns: Sequence[float], buckets: Sequence[str], ema: Mapping[str, float], *, population: bool
) -> list[float]:
    """The baseline of each return.

    With ``population=True``: the mean return of the *other* transitions of the batch in the same
    bucket (leave-one-out: unbiased, and it compares a trial's action with what other trials got
    at the same phase) when there are any; else the bucket's moving average; else the
    leave-one-out batch mean.
    """
    n = len(returns)
    total = sum(returns)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for r, b in zip(returns, buckets):
        sums[b] = sums.get(b, 0.0) + r
        counts[b] = counts.get(b, 0) + 1
    values = []
    for r, b in zip(returns, buckets):
        if population and counts[b] >= 2:
            values.append((sums[b] - r) / (counts[b] - 1))
        elif b in ema:
            values.append(ema[b])
        elif n >= 2:
            values.append((total - r) / (n - 1))
        else:
            values.append(0.0)
    return values


def update_ema(ema: dict[str, float], returns: Sequence[float], buckets: Sequence[str], decay: float) -> None:
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for r, b in zip(returns, buckets):
        sums[b] = sums.get(b, 0.0) + r
        counts[b] = counts.get(b, 0) + 1
    for b, s in sums.items():
        mean = s / counts[b]
        ema[b] = mean if b not in ema else decay * ema[b] + (1.0 - decay) * mean


def _standardise(advantages: torch.Tensor, normalize: bool) -> torch.Tensor:
    # Standardised in the batch: the scale of returns differs between tasks and phases, and
    # centring corrects a moving-average baseline that lags a drifting return.
    if normalize and advantages.shape[0] > 1:
        return (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    return advantages


def reinforce_update(
    network: PolicyNetwork,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    baseline: torch.Tensor,
    *,
    entropy_weight: float,
    max_grad_norm: float,
    normalize_advantages: bool,
    importance_clip: float,
) -> dict[str, float] | None:
    """One REINFORCE step on ``batch``. Returns its metrics, or ``None`` when the loss or the
    gradient is not finite (then the weights are left unchanged).

    With a stop head (and ``batch.stop_actions``), its term is ``-(w * A * log pi(choice|s))``
    with ``A = stop_return`` (baseline 0, see the module doc), scaled by the batch's RMS but not
    centred (centring would be a baseline); it gets no entropy bonus (one would push the stop
    probability towards 1/2 and end runs at random)."""
    lr_logits, wd_logits, stop_logits = network.heads(batch.states)
    lr_logp_all = torch.log_softmax(lr_logits, dim=-1)
    has_lr = batch.lr_actions >= 0
    lr_logp = lr_logp_all.gather(1, batch.lr_actions.clamp(min=0)[:, None]).squeeze(1)
    row_logp = torch.where(has_lr, lr_logp, torch.zeros_like(lr_logp))
    lr_entropy = -(lr_logp_all.exp() * lr_logp_all).sum(-1)
    row_entropy = torch.where(has_lr, lr_entropy, torch.zeros_like(lr_entropy))
    if wd_logits is not None:
        has_wd = batch.wd_actions >= 0
        wd_logp_all = torch.log_softmax(wd_logits, dim=-1)
        wd_logp = wd_logp_all.gather(1, batch.wd_actions.clamp(min=0)[:, None]).squeeze(1)
        row_logp = row_logp + torch.where(has_wd, wd_logp, torch.zeros_like(wd_logp))
        wd_entropy = -(wd_logp_all.exp() * wd_logp_all).sum(-1)
        row_entropy = row_entropy + torch.where(has_wd, wd_entropy, torch.zeros_like(wd_entropy))
    n = batch.returns.shape[0]
    logp = torch.zeros(n).index_add(0, batch.row_index, row_logp)
    stop_logp = stop_probs = None
    if stop_logits is not None and batch.stop_actions is not None:
        stop_logp_all = torch.log_softmax(stop_logits[batch.first_row], dim=-1)
        stop_logp = stop_logp_all.gather(1, batch.stop_actions[:, None]).squeeze(1)
        stop_probs = stop_logp_all[:, 1].exp()

    # A stop decision takes no lr/wd action: its return (0) stays out of the lr/wd heads' terms,
    # their standardisation and their metrics.
    acts = batch.acting()
    advantages = torch.zeros(n)
    advantages[acts] = _standardise((batch.returns - baseline)[acts], normalize_advantages)
    acting_logp = logp if stop_logp is None else logp + stop_logp
    importance = torch.exp(acting_logp.detach() - batch.behaviour_logp).clamp(max=importance_clip)

    pg_loss = -(importance * advantages * logp).mean()
    stop_pg_loss = torch.zeros(())
    if stop_logp is not None:
        stop_advantages = batch.stop_returns
        if normalize_advantages:
            stop_advantages = stop_advantages / (stop_advantages.square().mean().sqrt() + 1e-8)
        stop_pg_loss = -(importance * stop_advantages * stop_logp).mean()
    acting_rows = acts[batch.row_index]
    entropy = row_entropy[acting_rows].mean() if bool(acting_rows.any()) else torch.zeros(())
    entropy_loss = -entropy_weight * entropy
    loss = pg_loss + stop_pg_loss + entropy_loss
    if not torch.isfinite(loss):
        return None
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(network.parameters(), max_grad_norm)
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    # The metrics in one host read (each .item() on a tiny tensor costs as much as an op).
    acting_returns, acting_baseline = batch.returns[acts], baseline[acts]
    count = acting_returns.shape[0]
    none = torch.zeros(())
    values = torch.stack([
        pg_loss.detach(),
        entropy_loss.detach(),
        entropy.detach(),
        acting_baseline.mean() if count else none,
        acting_returns.mean() if count else none,
        (acting_returns - acting_baseline).std() if count > 1 else none,
        grad_norm,
        importance.mean(),
        *((stop_pg_loss.detach(), stop_probs.detach().mean(), batch.stop_returns.mean()) if stop_probs is not None else ()),
    ]).tolist()
    names = _METRIC_NAMES + (_STOP_METRIC_NAMES if stop_probs is not None else ())
    return dict(zip(names, values))


_METRIC_NAMES = (
    "policy/pg_loss",
    "policy/entropy_loss",
    "policy/entropy",
    "policy/baseline",
    "policy/mean_return",
    "policy/advantage_std",
    "policy/grad_norm",
    "policy/importance_weight",
)
_STOP_METRIC_NAMES = ("policy/stop_pg_loss", "policy/stop_prob", "policy/mean_stop_return")


class ValueNetwork(torch.nn.Module):
    """``V(state)``: the expected return of a decision from its state row (the learned baseline).

    One tanh hidden layer; the output layer starts at zero, so the first advantages are the
    returns themselves (centred by the batch standardisation).
    """

    def __init__(self, state_dim: int, hidden_size: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed + 1)  # not the policy's own init stream
        self.hidden = torch.nn.Linear(state_dim, hidden_size)
        self.out = torch.nn.Linear(hidden_size, 1)
        with torch.no_grad():
            bound = math.sqrt(3.0 / state_dim)
            self.hidden.weight.uniform_(-bound, bound, generator=generator)
            self.hidden.bias.zero_()
            self.out.weight.zero_()
            self.out.bias.zero_()

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(states))).squeeze(-1)


# The value fit must track returns faster than policy steps move them, from few batches (a quick
# benchmark gives the shared policy ~35 updates): a few Adam steps per batch at a larger lr.
_VALUE_LR = 3e-3
_VALUE_STEPS = 8


def value_baseline(value: ValueNetwork, batch: Batch) -> torch.Tensor:
    """Each transition's baseline: the mean of ``V`` over its rows (no gradient)."""
    with torch.no_grad():
        rows = value(batch.states)
    n = batch.returns.shape[0]
    counts = torch.zeros(n).index_add(0, batch.row_index, torch.ones_like(rows))
    return torch.zeros(n).index_add(0, batch.row_index, rows) / counts.clamp(min=1.0)


def value_update(value: ValueNetwork, optimizer: torch.optim.Optimizer, batch: Batch, max_grad_norm: float) -> float | None:
    """One squared-error step of ``V`` towards the batch's returns. Returns the loss (``None``: not finite)."""
    rows = value(batch.states)
    fit = batch.acting()[batch.row_index]  # a stop's return (0) is not a value of its state
    if not bool(fit.any()):
        return None
    loss = torch.nn.functional.mse_loss(rows[fit], batch.returns[batch.row_index][fit])
    if not torch.isfinite(loss):
        return None
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if not torch.isfinite(torch.nn.utils.clip_grad_norm_(value.parameters(), max_grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    return loss.item()


class Learner:
    """A policy, its Adam optimizer and its baseline: what learns from batches of transitions.

    Used inside one training process (local learning) and by the shared
    :class:`~ray_metaopt.rl.PolicyActor`; each :meth:`update` publishes a new ``version``.

    Args:
        config: the policy's :class:`PolicyConfig`.
        population_baseline: compare each return with the same-phase returns of the batch (many
            trials) instead of only the moving average.
        num_buckets: progress buckets of the baseline (1: one moving average).
        importance_clip: upper clip of the importance weight of stale transitions (>= 1).

    Example:
        >>> learner = Learner(PolicyConfig(batch_size=2))
        >>> t = {"rows": [[0.0] * learner.config.state_dim], "lr": [1], "wd": [1], "logp": -0.5,
        ...      "ret": 0.1, "progress": None, "decision": 0, "version": 0}
        >>> learner.update([t, dict(t, lr=[2], ret=-0.1)])["policy/version"]
        1
    """

    def __init__(
        self,
        config: PolicyConfig,
        *,
        population_baseline: bool = False,
        num_buckets: int = 1,
        importance_clip: float = 2.0,
    ) -> None:
        self.config = config
        self.population_baseline = bool(population_baseline)
        self.num_buckets = check_int("num_buckets", num_buckets, minimum=1)
        self.importance_clip = check_range("importance_clip", importance_clip, 1.0, math.inf, high_open=True)
        self.network = PolicyNetwork(config)
        # foreach, not fused: fused CPU Adam was x0.7 the actor's ingestion under 64 clients on 2 cores
        # (benchmarks/RESULTS-policy-actor.md, section 13), although faster alone.
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=config.policy_lr, foreach=True)
        self.baseline_ema: dict[str, float] = {}
        self.value: ValueNetwork | None = None
        self.value_optimizer: torch.optim.Optimizer | None = None
        if config.baseline == "value":
            self.value = ValueNetwork(config.state_dim, config.hidden_size, config.seed)
            self.value_optimizer = torch.optim.Adam(self.value.parameters(), lr=_VALUE_LR, foreach=True)
        self.version = 0
        self.updates = 0
        self.skipped_updates = 0
        self.last_metrics: dict[str, float] = {}

    def update(self, transitions: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """One REINFORCE step on ``transitions`` (validated by the caller). Returns its metrics."""
        returns = [float(t["ret"]) for t in transitions]
        buckets = [
            phase_bucket(t.get("progress"), int(t.get("decision", 0)), self.num_buckets) for t in transitions
        ]
        # A stop's return (0) is no lr decision's baseline: baselines come from the others.
        acting = [t.get("stop") != 1 for t in transitions]
        returns = [r for r, a in zip(returns, acting) if a]
        buckets = [b for b, a in zip(buckets, acting) if a]
        batch = Batch.from_transitions(transitions)
        with single_threaded():
            if self.value is not None:
                baseline = value_baseline(self.value, batch)
            else:
                values = iter(compute_baseline(returns, buckets, self.baseline_ema, population=self.population_baseline))
                baseline = torch.tensor([next(values) if a else 0.0 for a in acting], dtype=torch.float32)
            metrics = reinforce_update(
                self.network,
                self.optimizer,
                batch,
                baseline,
                entropy_weight=self.config.entropy_weight,
                max_grad_norm=self.config.max_grad_norm,
                normalize_advantages=self.config.normalize_advantages,
                importance_clip=self.importance_clip,
            )
            if metrics is not None and self.value is not None:
                for _ in range(_VALUE_STEPS):
                    value_loss = value_update(self.value, self.value_optimizer, batch, self.config.max_grad_norm)
                    if value_loss is None:
                        break
                    metrics.setdefault("policy/value_loss", value_loss)  # before the fit: out-of-sample
        if metrics is None:
            self.skipped_updates += 1
            return {"policy/version": self.version, "policy/skipped_updates": self.skipped_updates}
        update_ema(self.baseline_ema, returns, buckets, self.config.baseline_decay)
        self.version += 1
        self.updates += 1
        metrics["policy/version"] = self.version
        metrics["policy/updates"] = self.updates
        self.last_metrics = metrics
        return metrics

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.network.state_dict().items()}

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        self.network.load_state_dict(weights)

    def state_dict(self) -> dict[str, Any]:
        """Weights, optimizer, baseline (the value network's too) and counters (tensors and plain data)."""
        value = {}
        if self.value is not None:
            value = {
                "value_weights": {k: v.detach().clone() for k, v in self.value.state_dict().items()},
                "value_optimizer": self.value_optimizer.state_dict(),
            }
        return {
            "config": self.config.to_dict(),
            "weights": self.weights(),
            "optimizer": self.optimizer.state_dict(),
            **value,
            "baseline_ema": dict(self.baseline_ema),
            "version": self.version,
            "updates": self.updates,
            "skipped_updates": self.skipped_updates,
            "last_metrics": dict(self.last_metrics),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.load_weights(state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # this run's policy_lr, not the saved one
            group["lr"] = self.config.policy_lr
        if self.value is not None and "value_weights" in state:  # else (a policy without one): fresh
            self.value.load_state_dict(state["value_weights"])
            self.value_optimizer.load_state_dict(state["value_optimizer"])
        self.baseline_ema = dict(state["baseline_ema"])
        self.version = int(state["version"])
        self.updates = int(state["updates"])
        self.skipped_updates = int(state["skipped_updates"])
        self.last_metrics = dict(state["last_metrics"])
