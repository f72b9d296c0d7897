"""Mixture-of-experts regression: clustered inputs, a different target per cluster, a routed student."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..._validation import check_int, check_range
from ...moe import TinyMoE, moe_param_groups, routing_metrics
from .base import Task, TaskStep


class MoETask(Task):
    """Regression where each input cluster has its own target map; the student is a routed ``TinyMoE``.

    Inputs come from ``num_clusters`` Gaussian clusters (centres ``separation`` apart on
    average); cluster ``c`` maps ``x`` to ``A_c x + b_c`` plus noise, so a router that sends each
    cluster to its own expert wins. The student's param groups come from
    :func:`~ray_metaopt.moe.moe_param_groups` (roles ``gate``/``expert``/``shared``), and each
    step passes :func:`~ray_metaopt.moe.routing_metrics` of the real router logits (with the
    cluster ids as labels, as device tensors: no host sync) to the meta-optimizer, so
    expert/gate strategies act on real routing. Evaluation reports ``moe/routing_entropy``,
    ``moe/routing_sparsity``, ``moe/load_violation``, ``moe/expert_specialization`` on the
    validation set, and the noise floor ``moe/noise_floor``.

    The training loss adds ``balance_weight`` times the Switch-Transformer load-balancing loss
    (``E * sum_e f_e * P_e``), so the router does not collapse onto one expert.
    With ``z_loss_weight`` it also adds the ST-MoE router z-loss (the mean squared log-sum-exp of
    the router logits), which keeps the logits small and the routing numerically stable.

    Args:
        in_dim: input features.
        out_dim: regression targets.
        num_clusters: input clusters (distinct target maps).
        num_experts: experts in the student (default: ``num_clusters``).
        top_k: experts per token.
        hidden: expert width (times ``scale``).
        separation: scale of the cluster centres (larger: easier routing).
        noise_std: label noise standard deviation (the floor is its square).
        balance_weight: weight of the load-balancing loss (0 disables it).
        z_loss_weight: weight of the router z-loss (0, the default, disables it; ST-MoE uses 1e-3).
        gate_lr_scale: the gate groups' lr as a multiple of the configured lr.
        val_size: validation samples (times ``scale``).
        data_seed: seed of the clusters, target maps and validation set.
        **base: ``seed`` (the trial's: init, batch stream), ``device`` and ``scale``
            (1 for CI on CPUs, larger for a GPU): see :class:`~ray_metaopt.training.tasks.Task`.

    Example:
        >>> task = MoETask(seed=0, device="cpu")
        >>> model = task.build_model()
        >>> sorted(task.training_step(model, 32).metrics)
        ['expert_specialization', 'load_violation', 'routing_entropy', 'routing_sparsity']
    """

    def __init__(
        self,
        *,
        in_dim: int = 8,
        out_dim: int = 2,
        num_clusters: int = 4,
        num_experts: int | None = None,
        top_k: int = 1,
        hidden: int = 16,
        separation: float = 3.0,
        noise_std: float = 0.05,
        balance_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        gate_lr_scale: float = 1.0,
        val_size: int = 1024,
        data_seed: int = 0,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        self.in_dim = check_int("in_dim", in_dim, minimum=1)
        self.out_dim = check_int("out_dim", out_dim, minimum=1)
        self.num_clusters = check_int("num_clusters", num_clusters, minimum=1)
        self.num_experts = check_int(
            "num_experts", self.num_clusters if num_experts is None else num_experts, minimum=2
        )
        self.top_k = check_int("top_k", top_k, minimum=1)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts={self.num_experts}, got top_k={top_k}")
        self.hidden = check_int("hidden", hidden, minimum=1) * self.scale
        self.separation = check_range("separation", separation, 0.0)
        self.noise_std = check_range("noise_std", noise_std, 0.0, 1e3)
        self.balance_weight = check_range("balance_weight", balance_weight, 0.0)
        self.z_loss_weight = check_range("z_loss_weight", z_loss_weight, 0.0)
        self.gate_lr_scale = check_range("gate_lr_scale", gate_lr_scale, 0.0, low_open=True)
        self.val_size = check_int("val_size", val_size, minimum=1) * self.scale
        self.data_seed = check_int("data_seed", data_seed, minimum=0)

        gen = torch.Generator().manual_seed(self.data_seed)
        self.centres = self.separation * torch.randn(self.num_clusters, self.in_dim, generator=gen)
        self.maps = (
            torch.randn(self.num_clusters, self.out_dim, self.in_dim, generator=gen) / self.in_dim**0.5
        )
        self.offsets = torch.randn(self.num_clusters, self.out_dim, generator=gen)
        x_val, y_val, c_val, noise_val = self._sample(self.val_size, gen)
        self.x_val, self.y_val, self.c_val = (
            x_val.to(self.device),
            y_val.to(self.device),
            c_val.to(self.device),
        )
        self.val_noise_floor = float(noise_val.pow(2).mean())

    def _sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        c = torch.randint(self.num_clusters, (n,), generator=gen)
        x = self.centres[c] + torch.randn(n, self.in_dim, generator=gen)
        noise = self.noise_std * torch.randn(n, self.out_dim, generator=gen)
        y = torch.einsum("noi,ni->no", self.maps[c], x) + self.offsets[c] + noise
        return x, y, c, noise

    def build_model(self) -> nn.Module:
        with self.seeded():
            return TinyMoE(self.in_dim, self.hidden, self.out_dim, self.num_experts, self.top_k).to(
                self.device
            )

    def param_groups(self, model: nn.Module, *, lr: float, weight_decay: float | None) -> list[dict]:
        groups = moe_param_groups(
            model,
            lr=lr,
            weight_decay=0.0 if weight_decay is None else weight_decay,
            gate_lr=lr * self.gate_lr_scale,
            verbose=False,
        )
        if weight_decay is None:  # leave the optimizer's own default (or lack of one)
            for group in groups:
                del group["weight_decay"]
        return groups

    def _balance_loss(self, router_logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(router_logits, dim=-1)
        chosen = probs.topk(self.top_k, dim=-1).indices
        fraction = torch.zeros_like(probs).scatter_(1, chosen, 1.0).mean(0) / self.top_k
        return self.num_experts * (fraction * probs.mean(0)).sum()

    def _routing(self, router_logits: torch.Tensor, labels: torch.Tensor) -> dict:
        return routing_metrics(
            router_logits, top_k=self.top_k, labels=labels, num_labels=self.num_clusters, as_tensors=True
        )

    def training_step(self, model: nn.Module, batch_size: int) -> TaskStep:
        x, y, c, _ = self._sample(batch_size, self.generator)
        x, y, c = x.to(self.device), y.to(self.device), c.to(self.device)
        out, router_logits = model(x)
        loss = nn.functional.mse_loss(out, y)
        if self.balance_weight > 0:
            loss = loss + self.balance_weight * self._balance_loss(router_logits)
        if self.z_loss_weight > 0:
            loss = loss + self.z_loss_weight * torch.logsumexp(router_logits, dim=-1).pow(2).mean()
        return TaskStep(loss=loss, metrics=self._routing(router_logits, c))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        out, router_logits = model(self.x_val)
        metrics = {"val_loss": float(nn.functional.mse_loss(out, self.y_val))}
        metrics.update({k: float(v) for k, v in self._routing(router_logits, self.c_val).items()})
        return metrics

    def info(self) -> dict[str, float]:
        return {"noise_floor": self.noise_std**2, "val_noise_floor": self.val_noise_floor}
