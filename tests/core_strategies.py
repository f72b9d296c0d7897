"""Small deterministic strategies and models shared by the core tests."""

from __future__ import annotations

import torch

from ray_metaopt import HParamUpdate, MetaOptimizer


class ScaleEvery(MetaOptimizer):
    """Multiplies every group's lr by ``factor`` at each decision (and counts decisions)."""

    _state_attrs = ("calls", "seen")

    def __init__(self, factor: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor
        self.reset()

    def _init_state(self):
        self.calls = 0
        self.seen = []

    def decide(self, metrics, step, groups):
        self.calls += 1
        self.seen.append(metrics.get("loss"))
        return [HParamUpdate(g.index, "lr", g.lr * self.factor, f"scale x{self.factor}") for g in groups]


class LossTracker(MetaOptimizer):
    """A stateful toy strategy: lr = initial_lr / (1 + number of times the loss rose)."""

    _state_attrs = ("last", "rises")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.reset()

    def _init_state(self):
        self.last = None
        self.rises = 0

    def decide(self, metrics, step, groups):
        loss = metrics["loss"]
        if self.last is not None and loss > self.last:
            self.rises += 1
        self.last = loss
        return [
            HParamUpdate(g.index, "lr", g.initial_lr / (1 + self.rises), f"rises={self.rises}") for g in groups
        ]


def two_group_model(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    groups = [
        {"params": model[0].parameters(), "lr": 1e-2, "name": "body"},
        {"params": model[2].parameters(), "lr": 1e-3, "name": "head", "weight_decay": 0.1},
    ]
    return model, groups


def train_step(model, opt, x, y, step=None):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    decisions = opt.update_hyperparameters({"loss": loss.detach(), "grad_norm": grad_norm}, step)
    opt.step()
    return loss.item(), decisions
