"""Mixture-of-experts helpers: gate/expert param groups, routing metrics, and a tiny routed model.

- :func:`moe_param_groups` splits a model's parameters into ``gate`` / ``expert`` / ``shared``
  param groups (plus weight-decay-free variants for biases and norms) by parameter-name patterns,
  the groups :class:`~ray_metaopt.ExpertGateMetaOptimizer` recognises by their ``"role"``.
- :func:`routing_metrics` computes the routing statistics those strategies read
  (``routing_entropy``, ``routing_sparsity``, ``load_violation``, ``expert_specialization``) from
  router logits or probabilities, with torch ops only (no host sync with ``as_tensors=True``).
- :class:`TinyMoE` is a small top-k routed model for tests, examples and the built-in MoE task.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_int, check_range

__all__ = ["ROUTING_METRIC_KEYS", "TinyMoE", "moe_param_groups", "routing_metrics"]

#: The keys :func:`routing_metrics` returns (the MoE part of the metric vocabulary).
ROUTING_METRIC_KEYS = ("routing_entropy", "routing_sparsity", "load_violation", "expert_specialization")

PatternSpec = str | re.Pattern | Sequence[str | re.Pattern]


# --------------------------------------------------------------------------- name patterns
def compile_patterns(name: str, patterns: Any) -> tuple[re.Pattern, ...]:
    """Validate and compile name patterns (a str, a compiled regex, or a sequence of them).

    Each pattern is a regular expression searched (``re.search``) anywhere in a name, so a plain
    word such as ``"gate"`` matches as a substring (``"layers.0.moe.gate.weight"``). An empty
    sequence is allowed (matches nothing); an empty pattern is not (it would match everything).

    Raises:
        TypeError: a pattern is not a str / compiled regex.
        ValueError: an empty pattern or an invalid regular expression (naming ``name``).
    """
    if isinstance(patterns, (str, re.Pattern)):
        patterns = (patterns,)
    if not isinstance(patterns, (list, tuple)):
        raise TypeError(
            f"{name} must be a str, a compiled regex or a list/tuple of them, got {name}={patterns!r} "
            f"({type(patterns).__name__})"
        )
    compiled = []
    for pattern in patterns:
        if isinstance(pattern, re.Pattern):
            compiled.append(pattern)
            continue
        if not isinstance(pattern, str):
            raise TypeError(
                f"{name} entries must be str or compiled regex, got {name}={patterns!r} "
                f"(entry {pattern!r} is {type(pattern).__name__})"
            )
        if not pattern:
            raise ValueError(
                f"{name} must not contain an empty pattern (it matches every name), got {name}={patterns!r}"
            )
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(
                f"{name} has an invalid regular expression {pattern!r} ({err}), got {name}={patterns!r}"
            ) from None
    return tuple(compiled)


def matches_any(name: str, patterns: Iterable[re.Pattern]) -> bool:
    return any(p.search(name) for p in patterns)


# --------------------------------------------------------------------------- param groups
_ROLES = ("gate", "expert", "shared")


def _check_nonneg(name: str, value: Any) -> float:
    return check_range(name, value, 0.0, math.inf, high_open=True)


def moe_param_groups(
    model: nn.Module,
    *,
    gate_patterns: PatternSpec = ("gate", "router"),
    expert_patterns: PatternSpec = ("expert",),
    no_decay_patterns: PatternSpec = ("bias", "norm"),
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    gate_lr: float | None = None,
    expert_lr: float | None = None,
    require_gate: bool = True,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Split ``model``'s parameters into gate / expert / shared param groups by name.

    Every trainable parameter of ``model.named_parameters()`` lands in exactly one group:

    - role ``"expert"`` if its name matches an ``expert_patterns`` entry. Experts are tested
      *first*, so an expert's own gated-MLP projection (``experts.0.gate_proj.weight`` in
      Qwen-MoE / DeepSeek / Jamba naming) is an expert parameter, not the router;
    - else role ``"gate"`` if its name matches a ``gate_patterns`` entry (the router:
      ``block_sparse_moe.gate.weight``, ``mlp.router.classifier.weight``, ...);
    - else role ``"shared"`` (embeddings, attention, norms, heads...).

    Within each role, names matching ``no_decay_patterns`` (biases, norms) go to a separate group
    named ``"<role>_no_decay"`` with ``weight_decay=0``; the others get ``weight_decay``. Groups
    are ordered gate, gate_no_decay, expert, expert_no_decay, shared, shared_no_decay; empty
    groups are dropped. A parameter reachable under several names (tied / shared weights) is
    placed once, by the first name ``named_parameters`` gives; frozen parameters
    (``requires_grad=False``) are left out.

    Patterns are regular expressions searched anywhere in the full dotted name (``re.search``),
    so plain words match as substrings; use anchors or ``\\b``/``\\.`` for exact components
    (``r"\\.gate\\."``). A single str is one pattern.

    Args:
        model: the model whose parameters to split.
        gate_patterns: router / gating parameter names.
        expert_patterns: expert parameter names (checked before ``gate_patterns``).
        no_decay_patterns: names that get ``weight_decay=0`` (``()`` for none).
        lr: learning rate of the shared groups (and of the others unless given).
        weight_decay: weight decay of the decayed groups.
        gate_lr: learning rate of the gate groups (default ``lr``).
        expert_lr: learning rate of the expert groups (default ``lr``).
        require_gate: raise ``ValueError`` when no parameter matches ``gate_patterns``.
        verbose: print the number of tensors and scalars per group, like nanoGPT's
            ``configure_optimizers``.

    Returns:
        A list of param-group dicts with keys ``params``, ``name``, ``role``, ``lr``,
        ``weight_decay``, ready for any ``torch.optim`` optimizer.

    Example:
        >>> model = TinyMoE(8, 16, 4, num_experts=4, top_k=1)
        >>> groups = moe_param_groups(model, lr=1e-3, weight_decay=0.1)
        num gate parameter tensors: 1, with 32 parameters
        ...
        >>> opt = torch.optim.AdamW(groups)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got model={model!r} ({type(model).__name__})")
    gate_re = compile_patterns("gate_patterns", gate_patterns)
    expert_re = compile_patterns("expert_patterns", expert_patterns)
    no_decay_re = compile_patterns("no_decay_patterns", no_decay_patterns)
    lr = _check_nonneg("lr", lr)
    weight_decay = _check_nonneg("weight_decay", weight_decay)
    gate_lr = lr if gate_lr is None else _check_nonneg("gate_lr", gate_lr)
    expert_lr = lr if expert_lr is None else _check_nonneg("expert_lr", expert_lr)
    if not isinstance(require_gate, bool):
        raise TypeError(f"require_gate must be a bool, got require_gate={require_gate!r}")

    buckets: dict[tuple[str, bool], list[tuple[str, nn.Parameter]]] = {
        (role, no_decay): [] for role in _ROLES for no_decay in (False, True)
    }
    seen: set[int] = set()
    num_aliases = num_frozen = 0
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            num_aliases += 1
            continue
        seen.add(id(param))
        if not param.requires_grad:
            num_frozen += 1
            continue
        if matches_any(name, expert_re):
            role = "expert"
        elif matches_any(name, gate_re):
            role = "gate"
        else:
            role = "shared"
        buckets[(role, matches_any(name, no_decay_re))].append((name, param))

    if not seen:
        raise ValueError(f"model has no parameters, got model={type(model).__name__}")
    if require_gate and not (buckets[("gate", False)] or buckets[("gate", True)]):
        names = [n for n, _ in model.named_parameters()]
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(
            f"no parameter name of {type(model).__name__} matches gate_patterns={gate_patterns!r} "
            f"(parameters: {shown}); pass gate_patterns that match the router, or require_gate=False"
        )

    lrs = {"gate": gate_lr, "expert": expert_lr, "shared": lr}
    groups = []
    for role in _ROLES:
        for no_decay in (False, True):
            members = buckets[(role, no_decay)]
            if not members:
                continue
            name = f"{role}_no_decay" if no_decay else role
            groups.append(
                {
                    "params": [p for _, p in members],
                    "name": name,
                    "role": role,
                    "lr": lrs[role],
                    "weight_decay": 0.0 if no_decay else weight_decay,
                }
            )
            if verbose:
                count = sum(p.numel() for _, p in members)
                print(f"num {name} parameter tensors: {len(members)}, with {count:,} parameters")
    if verbose and (num_aliases or num_frozen):
        print(f"left out: {num_aliases} tied/shared aliases (placed once), {num_frozen} frozen tensors")
    return groups


# --------------------------------------------------------------------------- routing metrics
def _float_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.dtype == torch.float64 else torch.float32


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(-1)


def _one_layer(
    x: torch.Tensor,
    is_logits: bool,
    *,
    top_k: int,
    labels: torch.Tensor | None,
    num_labels: int | None,
    mask: torch.Tensor | None,
    sparsity_threshold: float,
) -> torch.Tensor:
    """The four metrics of one router output, stacked in ROUTING_METRIC_KEYS order."""
    num_experts = x.shape[-1]
    dtype = _float_dtype(x)
    x = x.detach().reshape(-1, num_experts).to(dtype)
    if is_logits:
        p = torch.softmax(x, dim=-1)
    else:
        p = x.clamp_min(0.0)
        p = p / p.sum(-1, keepdim=True)
    n = p.shape[0]
    if mask is None:
        w = torch.ones(n, dtype=dtype, device=p.device)
    else:
        w = mask.detach().reshape(n).to(dtype=dtype, device=p.device)
    total = w.sum()
    log_e = math.log(num_experts)

    token_entropy = _entropy(p)  # (N,)
    entropy = (w * token_entropy).sum() / total / log_e

    near_zero = (p < sparsity_threshold / num_experts).to(dtype).sum(-1) / (num_experts - 1)
    sparsity = (w * near_zero).sum() / total

    top = p.topk(top_k, dim=-1).indices
    assigned = torch.zeros_like(p).scatter_(1, top, 1.0)
    load = (w[:, None] * assigned).sum(0)  # tokens (slots) per expert
    load_violation = load.max() / (total * top_k / num_experts) - 1.0

    if labels is None:
        # I(expert; token) = H(mean routing) - mean per-token entropy, normalised by log E.
        mean_p = (w[:, None] * p).sum(0) / total
        specialization = (_entropy(mean_p) - entropy * log_e) / log_e
    else:
        onehot = F.one_hot(labels.reshape(n).to(device=p.device, dtype=torch.long), num_labels).to(dtype)
        joint = (onehot * w[:, None]).T @ p / total  # P(cluster, expert), (C, E)
        h_c = _entropy(joint.sum(1))
        h_e = _entropy(joint.sum(0))
        h_ce = _entropy(joint.reshape(-1))
        mutual = h_c + h_e - h_ce
        # Uncertainty coefficient U(C|E) = I(C;E)/H(C); 0 when there is a single cluster.
        specialization = torch.where(h_c > 1e-12, mutual / h_c.clamp_min(1e-12), torch.zeros_like(h_c))
    specialization = specialization.clamp(0.0, 1.0)
    return torch.stack([entropy.clamp(0.0, 1.0), sparsity, load_violation.clamp_min(0.0), specialization])


def routing_metrics(
    router_logits: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    probs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    top_k: int = 1,
    labels: torch.Tensor | None = None,
    num_experts: int | None = None,
    num_labels: int | None = None,
    mask: torch.Tensor | None = None,
    sparsity_threshold: float = 0.1,
    as_tensors: bool = False,
) -> dict[str, Any]:
    """Routing statistics of a mixture-of-experts router, in the names the strategies read.

    Give the router's ``router_logits`` (softmax is applied) or its ``probs`` (renormalised to sum
    to 1 over experts), shaped ``(..., num_experts)``; every leading position is one token. With
    ``p_t`` the routing distribution of token ``t`` over ``E`` experts:

    - ``routing_entropy``: mean over tokens of ``H(p_t) / log E``, in [0, 1]: 1 for uniform
      routing, 0 for one-hot (fully confident) routing.
    - ``routing_sparsity``: mean over tokens of the fraction of the ``E - 1`` non-leading experts
      whose probability is below ``sparsity_threshold / E`` (by default a tenth of the uniform
      share), in [0, 1]: 0 for uniform routing, 1 for one-hot routing. (At most ``E - 1``
      experts can be below ``1/E``, hence the normalisation.)
    - ``load_violation``: ``max_e load_e / mean_e load_e - 1`` where ``load_e`` counts the tokens
      whose top-``top_k`` experts include ``e`` (ties go to the lower expert index, as in
      ``torch.topk``); 0 for perfectly balanced dispatch, at most ``E / top_k - 1`` (everything
      on the same experts).
    - ``expert_specialization``, in [0, 1]. With ``labels`` (the cluster / class / domain id of
      each token): the uncertainty coefficient ``I(C; X) / H(C)`` of cluster ``C`` given expert
      ``X`` under the joint ``P(c, x) = mean_t [c_t = c] p_t(x)``: 1 when each expert receives
      tokens of a single cluster, 0 when routing is independent of the cluster (or there is one
      cluster). Without labels: the mutual information between expert and token,
      ``(H(mean_t p_t) - mean_t H(p_t)) / log E``: 1 when tokens are routed confidently *and*
      spread evenly over experts, 0 for uniform routing and for collapse onto one expert.

    Args:
        router_logits: router outputs before softmax, a tensor ``(..., E)`` or a list of them
            (one per MoE layer, e.g. Hugging Face's ``output.router_logits``).
        probs: routing probabilities instead of logits (same shapes).
        top_k: experts per token in the dispatch (for ``load_violation``), 1 <= top_k <= E.
        labels: integer cluster ids with the leading shape of the router output.
        num_experts: if given, must equal the last dimension (a shape check).
        num_labels: number of label values (``labels < num_labels``). Default ``labels.max()+1``,
            which reads the tensor (one host sync); pass it to stay sync-free.
        mask: bool or 0/1 tensor with the leading shape; tokens where it is 0 (padding) are left
            out. With no token left every metric is NaN (the wrapper then skips the decision).
        sparsity_threshold: fraction of the uniform share ``1/E`` below which a probability
            counts as near zero, in (0, 1].
        as_tensors: return 0-dim tensors on the router's device (no host sync; pass them straight
            to ``OptimizerWrapper.update_hyperparameters``) instead of Python floats.

    With a list of layers, entropy, sparsity and specialization are averaged over layers and
    ``load_violation`` is the worst layer's.

    Returns:
        ``{"routing_entropy", "routing_sparsity", "load_violation", "expert_specialization"}``.

    Example:
        >>> routing_metrics(probs=torch.eye(4))  # 4 tokens, each sure of a different expert
        {'routing_entropy': 0.0, 'routing_sparsity': 1.0, 'load_violation': 0.0, 'expert_specialization': 1.0}
        >>> out, logits = model(x)  # in a training loop: device tensors, read at decision steps only
        >>> opt.update_hyperparameters({"loss": loss.detach(), **routing_metrics(logits, as_tensors=True)})
    """
    if (router_logits is None) == (probs is None):
        raise ValueError(
            "give exactly one of router_logits and probs, got "
            f"router_logits={'None' if router_logits is None else 'a tensor'}, "
            f"probs={'None' if probs is None else 'a tensor'}"
        )
    is_logits = router_logits is not None
    arg = "router_logits" if is_logits else "probs"
    value = router_logits if is_logits else probs
    layers = list(value) if isinstance(value, (list, tuple)) else [value]
    if not layers:
        raise ValueError(f"{arg} must not be an empty list, got {arg}={value!r}")
    for i, t in enumerate(layers):
        where = arg if len(layers) == 1 and not isinstance(value, (list, tuple)) else f"{arg}[{i}]"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where} must be a torch.Tensor, got {where}={t!r} ({type(t).__name__})")
        if not t.is_floating_point() or t.dim() < 1:
            raise TypeError(
                f"{where} must be a floating-point tensor of shape (..., num_experts), "
                f"got dtype={t.dtype}, shape={tuple(t.shape)}"
            )
    e = layers[0].shape[-1]
    if any(t.shape[-1] != e for t in layers):
        raise ValueError(f"{arg} layers disagree on num_experts: {[t.shape[-1] for t in layers]}")
    if e < 2:
        raise ValueError(f"routing needs at least 2 experts, got {arg} with last dimension {e}")
    if num_experts is not None and check_int("num_experts", num_experts, minimum=2) != e:
        raise ValueError(
            f"num_experts must equal the last dimension of {arg} ({e}), got num_experts={num_experts}"
        )
    top_k = check_int("top_k", top_k, minimum=1)
    if top_k > e:
        raise ValueError(f"top_k must be <= num_experts={e}, got top_k={top_k}")
    sparsity_threshold = check_range("sparsity_threshold", sparsity_threshold, 0.0, 1.0, low_open=True)
    for extra_name, extra in (("labels", labels), ("mask", mask)):
        if extra is None:
            continue
        if not isinstance(extra, torch.Tensor):
            raise TypeError(
                f"{extra_name} must be a torch.Tensor, got {extra_name}={extra!r} ({type(extra).__name__})"
            )
        for t in layers:
            if tuple(extra.shape) != tuple(t.shape[:-1]):
                raise ValueError(
                    f"{extra_name} must have the leading shape of {arg} {tuple(t.shape[:-1])}, "
                    f"got {extra_name} of shape {tuple(extra.shape)}"
                )
    if labels is not None:
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got dtype={labels.dtype}")
        if num_labels is None:
            num_labels = int(labels.max().item()) + 1 if labels.numel() else 1
        num_labels = check_int("num_labels", num_labels, minimum=1)
    if not isinstance(as_tensors, bool):
        raise TypeError(f"as_tensors must be a bool, got as_tensors={as_tensors!r}")

    with torch.no_grad():
        per_layer = torch.stack(
            [
                _one_layer(
                    t,
                    is_logits,
                    top_k=top_k,
                    labels=labels,
                    num_labels=num_labels,
                    mask=mask,
                    sparsity_threshold=sparsity_threshold,
                )
                for t in layers
            ]
        )
        values = per_layer.mean(0)
        values[2] = per_layer[:, 2].max()
    if as_tensors:
        return dict(zip(ROUTING_METRIC_KEYS, values.unbind(0)))
    return dict(zip(ROUTING_METRIC_KEYS, values.tolist()))


# --------------------------------------------------------------------------- TinyMoE
class _ExpertMLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TinyMoE(nn.Module):
    """A small top-k routed mixture of experts: ``norm -> gate (router) -> experts``.

    ``norm`` is a LayerNorm on the input, ``gate`` a ``Linear(in_dim, num_experts)`` router and
    ``experts`` a ``ModuleList`` of two-layer GELU MLPs (``fc1``, ``fc2``). Each token goes to
    its ``top_k`` most probable experts, whose outputs are summed weighted by their routing
    probabilities (not renormalised, as in Switch/GShard, so the router gets a gradient even with
    ``top_k=1``). Every expert is computed densely and masked, which is simple, sync-free and fast
    at this size.

    Args:
        in_dim: input features.
        hidden: hidden width of each expert.
        out_dim: output features.
        num_experts: number of experts (>= 2).
        top_k: experts per token (1 <= top_k <= num_experts).

    Example:
        >>> model = TinyMoE(8, 16, 3, num_experts=4, top_k=2)
        >>> out, router_logits = model(torch.randn(32, 8))
        >>> out.shape, router_logits.shape
        (torch.Size([32, 3]), torch.Size([32, 4]))
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_experts: int, top_k: int = 1) -> None:
        super().__init__()
        self.in_dim = check_int("in_dim", in_dim, minimum=1)
        self.hidden = check_int("hidden", hidden, minimum=1)
        self.out_dim = check_int("out_dim", out_dim, minimum=1)
        num_experts = check_int("num_experts", num_experts, minimum=2)
        self.top_k = check_int("top_k", top_k, minimum=1)
        if self.top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts={num_experts}, got top_k={top_k}")
        self.norm = nn.LayerNorm(in_dim)
        self.gate = nn.Linear(in_dim, num_experts)
        # Router rows of experts added by add_expert() (a Linear cannot grow in place).
        self.gate_extra = nn.ParameterList()
        self.experts = nn.ModuleList(_ExpertMLP(in_dim, hidden, out_dim) for _ in range(num_experts))

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits ``(..., num_experts)`` for already-normalised input ``x``."""
        logits = self.gate(x)
        if len(self.gate_extra):
            logits = torch.cat([logits, x @ torch.stack(list(self.gate_extra)).T], dim=-1)
        return logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(output (..., out_dim), router_logits (..., num_experts))``."""
        lead = x.shape[:-1]
        h = self.norm(x.reshape(-1, self.in_dim))
        logits = self.router_logits(h)
        probs = torch.softmax(logits, dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        weights = torch.zeros_like(probs).scatter(1, top_i, top_p)  # (N, E), zero off the top-k
        outs = torch.stack([expert(h) for expert in self.experts], dim=1)  # (N, E, out)
        out = torch.einsum("ne,neo->no", weights, outs)
        return out.reshape(*lead, self.out_dim), logits.reshape(*lead, self.num_experts)

    def add_expert(self) -> dict[str, list[nn.Parameter]]:
        """Append a freshly initialised expert and its router row (initially logit 0 for every input).

        Returns the new parameters by role, ready for ``optimizer.add_param_group``::

            new = model.add_expert()
            opt.add_param_group({"params": new["expert"], "role": "expert", "name": "expert_5", "lr": 1e-3})
            opt.add_param_group({"params": new["gate"], "role": "gate", "name": "gate_5", "lr": 1e-3})
        """
        ref = self.gate.weight
        row = nn.Parameter(torch.zeros(self.in_dim, device=ref.device, dtype=ref.dtype))
        expert = _ExpertMLP(self.in_dim, self.hidden, self.out_dim).to(device=ref.device, dtype=ref.dtype)
        self.gate_extra.append(row)
        self.experts.append(expert)
        return {"expert": list(expert.parameters()), "gate": [row]}
