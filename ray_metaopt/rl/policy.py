"""The policy: its configuration (action spaces, network size, learning rates), network and sampling.

The policy maps a state row (:mod:`~ray_metaopt.rl.features`) to two independent categorical
distributions: one over ``lr_actions`` and one over ``wd_actions``. What an action *means*
depends on ``action_mode``:

- ``"anchored"`` (default): ``lr <- base_lr(t) * lr_actions[i]`` and ``weight_decay <-
  max(initial_wd + wd_actions[j], 0)``, re-anchored on the user's schedule at every decision
  (never compounding); the "keep" action follows the base schedule exactly.
- ``"multiplicative"`` (the seed's action space, opt-in): ``lr <- lr * lr_actions[i]`` and
  ``weight_decay <- weight_decay + wd_actions[j]``; changes compound from one decision to the next
  (measured: the lr random-walks away from a good value).
- ``"schedule"``: the lr follows a base schedule (cosine by default) times a per-group scale, and
  ``lr_actions[i]`` multiplies that scale within bounds. Doing nothing follows the schedule.

The network runs on the CPU on purpose: it is a few thousand weights evaluated once per decision
on features that are already Python floats, so a GPU round trip would only add latency.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from .._validation import check_choice, check_finite, check_int, check_range
from .features import STATE_DIM

ACTION_MODES = ("anchored", "multiplicative", "schedule")
BASELINES = ("average", "value")
_MASK64 = (1 << 64) - 1


def _check_actions(name: str, actions: Any, *, positive: bool) -> tuple[float, ...]:
    if isinstance(actions, (str, bytes)) or not isinstance(actions, Sequence):
        raise TypeError(f"{name} must be a list of numbers, got {name}={actions!r}")
    if len(actions) == 0:
        raise ValueError(f"{name} must hold at least one action, got {name}={list(actions)!r}")
    values = tuple(check_finite(f"{name}[{i}]", a) for i, a in enumerate(actions))
    if positive:
        for i, a in enumerate(values):
            if a <= 0.0:
                raise ValueError(f"{name} must be positive multipliers, got {name}[{i}]={a!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must not repeat an action, got {name}={list(values)!r}")
    return values


@dataclass(frozen=True)
class PolicyConfig:
    """Everything that defines the policy and how it learns; shared by a trial and the actor.

    The same dict goes to :class:`~ray_metaopt.rl.RLMetaOptimizer` (as keyword arguments) and to
    :func:`~ray_metaopt.rl.start_policy_actor` (as ``policy_config``); :meth:`signature` is what
    must match between them.

    Args:
        lr_actions: lr multipliers to choose from (positive, at least one).
        wd_actions: weight-decay shifts to choose from, or ``None`` for no weight-decay head.
        action_mode: ``"anchored"``, ``"multiplicative"`` or ``"schedule"`` (see module doc).
        hidden_size: width of the two hidden layers.
        initial_keep_prob: initial probability of the "keep" action (the lr action closest to
            1, the weight-decay action closest to 0); ``None`` starts uniform. Starting near
            "keep" stops an untrained policy from random-walking the lr away.
        policy_lr: Adam learning rate of the policy.
        entropy_weight: weight of the entropy bonus (>= 0).
        max_grad_norm: gradient clipping of each policy update.
        batch_size: transitions per policy update.
        gamma: discount of later intervals' rewards in an action's return.
        return_horizon: rewards summed into a return (truncated; the rest is discounted away).
        normalize_advantages: standardise advantages in each batch (centre, unit variance).
        baseline_decay: decay of the moving-average baseline.
        baseline: ``"average"`` (moving averages per progress bucket; with a shared policy, the
            same-phase returns of other trials) or ``"value"``: a learned value ``V(state)`` (a
            small MLP fit to the returns by squared error), which sees the state's absolute
            features (lr scale, loss, progress), so an advantage compares an action with what
            was expected *from that state*, not with trials that drew another initial lr.
        seed: seed of the network's initial weights.
        stop_action: add a third head, "continue" / "stop this run now" (see
            :class:`~ray_metaopt.rl.RLMetaOptimizer`'s ``stop_action``).
        initial_stop_prob: the stop head's initial probability of "stop" at a decision, whatever
            the state (exploration while learning; a frozen policy stops only above 0.5).

    Example:
        >>> cfg = PolicyConfig(lr_actions=[0.5, 1.0, 2.0], wd_actions=None, policy_lr=1e-3)
        >>> cfg.num_lr_actions, cfg.num_wd_actions
        (3, 0)
    """

    lr_actions: Sequence[float] = (0.5, 1.0, 2.0)
    wd_actions: Sequence[float] | None = (-1e-5, 0.0, 1e-5)
    action_mode: str = "anchored"
    hidden_size: int = 32
    initial_keep_prob: float | None = 0.8
    policy_lr: float = 1e-4
    entropy_weight: float = 0.01
    max_grad_norm: float = 1.0
    batch_size: int = 32
    gamma: float = 0.9
    return_horizon: int = 20
    normalize_advantages: bool = True
    baseline_decay: float = 0.9
    baseline: str = "average"
    seed: int = 0
    stop_action: bool = False
    initial_stop_prob: float = 0.02
    state_dim: int = field(default=STATE_DIM, init=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise fields once, here
        set_(self, "lr_actions", _check_actions("lr_actions", self.lr_actions, positive=True))
        if self.wd_actions is not None:
            set_(self, "wd_actions", _check_actions("wd_actions", self.wd_actions, positive=False))
        check_choice("action_mode", self.action_mode, ACTION_MODES)
        set_(self, "hidden_size", check_int("hidden_size", self.hidden_size, minimum=1))
        if self.initial_keep_prob is not None:
            set_(
                self,
                "initial_keep_prob",
                check_range(
                    "initial_keep_prob", self.initial_keep_prob, 0.0, 1.0, low_open=True, high_open=True
                ),
            )
        set_(
            self,
            "policy_lr",
            check_range("policy_lr", self.policy_lr, 0.0, math.inf, low_open=True, high_open=True),
        )
        set_(
            self,
            "entropy_weight",
            check_range("entropy_weight", self.entropy_weight, 0.0, math.inf, high_open=True),
        )
        set_(
            self,
            "max_grad_norm",
            check_range("max_grad_norm", self.max_grad_norm, 0.0, math.inf, low_open=True, high_open=True),
        )
        set_(self, "batch_size", check_int("batch_size", self.batch_size, minimum=1))
        set_(self, "gamma", check_range("gamma", self.gamma, 0.0, 1.0))
        set_(self, "return_horizon", check_int("return_horizon", self.return_horizon, minimum=1))
        if not isinstance(self.normalize_advantages, bool):
            raise TypeError(
                f"normalize_advantages must be a bool, got normalize_advantages={self.normalize_advantages!r}"
            )
        set_(
            self,
            "baseline_decay",
            check_range("baseline_decay", self.baseline_decay, 0.0, 1.0, high_open=True),
        )
        check_choice("baseline", self.baseline, BASELINES)
        set_(self, "seed", check_int("seed", self.seed, minimum=0))
        if not isinstance(self.stop_action, bool):
            raise TypeError(f"stop_action must be a bool, got stop_action={self.stop_action!r}")
        set_(
            self,
            "initial_stop_prob",
            check_range("initial_stop_prob", self.initial_stop_prob, 0.0, 0.5, low_open=True, high_open=True),
        )

    @property
    def num_lr_actions(self) -> int:
        return len(self.lr_actions)

    @property
    def num_wd_actions(self) -> int:
        return 0 if self.wd_actions is None else len(self.wd_actions)

    @property
    def keep_lr_index(self) -> int:
        """Index of the lr action closest to "no change" (1.0, in log space)."""
        return min(range(len(self.lr_actions)), key=lambda i: abs(math.log(self.lr_actions[i])))

    @property
    def keep_wd_index(self) -> int | None:
        if self.wd_actions is None:
            return None
        return min(range(len(self.wd_actions)), key=lambda i: abs(self.wd_actions[i]))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, numbers): travels through Ray and loads with ``weights_only=True``."""
        d = asdict(self)
        d.pop("state_dim")
        d["lr_actions"] = list(self.lr_actions)
        d["wd_actions"] = None if self.wd_actions is None else list(self.wd_actions)
        return d

    @classmethod
    def field_names(cls) -> set[str]:
        """The keys :meth:`from_dict` accepts (what the shared actor owns)."""
        return {f.name for f in fields(cls) if f.init}

    @classmethod
    def from_dict(cls, config: Mapping[str, Any] | None) -> PolicyConfig:
        """Build from a dict of :class:`PolicyConfig` fields; unknown keys are an error."""
        config = dict(config or {})
        known = cls.field_names()
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"policy_config has unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**config)

    def signature(self) -> dict[str, Any]:
        """What must be equal for two processes to share weights and mean the same actions."""
        return {
            "lr_actions": list(self.lr_actions),
            "wd_actions": None if self.wd_actions is None else list(self.wd_actions),
            "action_mode": self.action_mode,
            "hidden_size": self.hidden_size,
            "state_dim": self.state_dim,
            "stop_action": self.stop_action,
        }


    def require_compatible(self, other: Mapping[str, Any] | PolicyConfig, source: str, hint: str) -> None:
        """Raise a ``ValueError`` unless ``other`` (a config or its :meth:`signature`) shares weights with this one.

        The message reads ``"{source} k=theirs (here ours), ...; {hint}"``.

        Example:
            >>> config.require_compatible(saved, f"policy_path={path!r} holds a policy with", "pass the same values")
        """
        theirs = other.signature() if isinstance(other, PolicyConfig) else dict(other)
        ours = self.signature()
        mismatch = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        if mismatch:
            detail = ", ".join(f"{k}={theirs.get(k)!r} (here {ours.get(k)!r})" for k in mismatch)
            raise ValueError(f"{source} {detail}; {hint}")


class PolicyNetwork(torch.nn.Module):
    """Two tanh hidden layers and one softmax head per action space (lr, weight decay if any,
    and with ``stop_action`` a two-way head: index 0 "continue", 1 "stop").

    Args:
        config: the :class:`PolicyConfig`; its ``seed`` fixes the initial weights (on any
            platform: drawn with torch's CPU generator, no LAPACK).

    Example:
        >>> net = PolicyNetwork(PolicyConfig(seed=0))
        >>> lr_logits, wd_logits = net(torch.zeros(4, net.config.state_dim))
        >>> lr_logits.shape
        torch.Size([4, 3])
    """

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.body = torch.nn.Sequential(
            torch.nn.Linear(config.state_dim, h), torch.nn.Tanh(), torch.nn.Linear(h, h), torch.nn.Tanh()
        )
        self.lr_head = torch.nn.Linear(h, config.num_lr_actions)
        self.wd_head = torch.nn.Linear(h, config.num_wd_actions) if config.num_wd_actions else None
        self.stop_head = torch.nn.Linear(h, 2) if config.stop_action else None
        self._views: dict[str, torch.Tensor] | None = None
        self._init_weights()

    def _init_weights(self) -> None:
        gen = torch.Generator().manual_seed(self.config.seed)

        def uniform_(tensor: torch.Tensor, bound: float) -> None:
            with torch.no_grad():
                tensor.copy_((torch.rand(tensor.shape, generator=gen) * 2.0 - 1.0) * bound)

        for layer in self.body:
            if isinstance(layer, torch.nn.Linear):
                uniform_(layer.weight, math.sqrt(3.0 / layer.in_features))
                torch.nn.init.zeros_(layer.bias)
        heads = [(self.lr_head, self.config.keep_lr_index)]
        if self.wd_head is not None:
            heads.append((self.wd_head, self.config.keep_wd_index))
        for head, keep in heads:
            # Small weights: the initial policy is (almost) the prior in the bias, whatever the state.
            uniform_(head.weight, 0.01 / math.sqrt(head.in_features))
            with torch.no_grad():
                head.bias.copy_(self._prior_logits(head.out_features, keep))
        if self.stop_head is not None:  # drawn last: the other heads' weights are those of a policy without it
            uniform_(self.stop_head.weight, 0.01 / math.sqrt(self.stop_head.in_features))
            p = self.config.initial_stop_prob
            with torch.no_grad():
                self.stop_head.bias.copy_(torch.tensor([1.0 - p, p]).log())

    def _prior_logits(self, n: int, keep: int) -> torch.Tensor:
        p = self.config.initial_keep_prob
        if p is None or n == 1:
            return torch.zeros(n)
        probs = torch.full((n,), (1.0 - p) / (n - 1))
        probs[keep] = p
        return probs.log()

    def heads(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Logits of the lr, weight-decay and stop heads (``None`` for a head the policy lacks)."""
        hidden = self.body(states)
        wd = None if self.wd_head is None else self.wd_head(hidden)
        stop = None if self.stop_head is None else self.stop_head(hidden)
        return self.lr_head(hidden), wd, stop

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        lr, wd, _ = self.heads(states)
        return lr, wd

    def act_log_probs(self, rows: list[list[float]]) -> tuple[list[list[float]], list[list[float]] | None]:
        """Log-probabilities of the lr and weight-decay heads for state rows, as Python lists.

        Same numbers as :meth:`forward` + ``log_softmax``, without autograd or module dispatch:
        it runs once per decision inside the training loop, so its fixed cost matters. It reads
        detached views of the parameters, which see every in-place update (optimizer steps,
        ``load_state_dict``).
        """
        lr_logp, wd_logp, _ = self.act_all_log_probs(rows)
        return lr_logp, wd_logp

    def act_all_log_probs(
        self, rows: list[list[float]]
    ) -> tuple[list[list[float]], list[list[float]] | None, list[list[float]] | None]:
        """:meth:`act_log_probs` and the stop head's log-probabilities (``None`` without one)."""
        if self._views is None:
            self._views = {name: p.detach() for name, p in self.named_parameters()}
        v = self._views
        linear = torch.nn.functional.linear
        hidden = torch.tanh(linear(torch.tanh(linear(torch.tensor(rows), v["body.0.weight"], v["body.0.bias"])),
                                   v["body.2.weight"], v["body.2.bias"]))

        def head(name: str) -> list[list[float]] | None:
            if f"{name}.weight" not in v:
                return None
            return torch.log_softmax(linear(hidden, v[f"{name}.weight"], v[f"{name}.bias"]), dim=-1).tolist()

        return head("lr_head"), head("wd_head"), head("stop_head")


def uniform(seed: int, counter: int) -> float:
    """A deterministic uniform draw in [0, 1) from ``(seed, counter)`` (SplitMix64).

    Sampling with a counter instead of a stateful generator keeps the meta-optimizer's state
    plain data (two ints) and makes a resumed run draw exactly the same numbers.
    """
    z = (seed * 0x9E3779B97F4A7C15 + (counter + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) * (1.0 / (1 << 53))


def sample_index(probs: Sequence[float], u: float) -> int:
    """Inverse-CDF sample of a categorical distribution with the uniform draw ``u``."""
    total = 0.0
    for i, p in enumerate(probs):
        total += p
        if u < total:
            return i
    return len(probs) - 1


def argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])
