"""Teacher-student regression: a student MLP learns a fixed random teacher from noisy samples."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..._validation import check_int, check_range
from .base import Task, TaskStep


def _mlp(in_dim: int, hidden: int, out_dim: int, depth: int, activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), activation()]
        width = hidden
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class TeacherStudentTask(Task):
    """Regress a random tanh teacher network from an endless stream of noisy samples.

    ``x ~ N(0, I)``, ``y = teacher(x) + noise_std * eps``. The best possible mean squared error is
    the noise variance ``noise_std ** 2``: the *noise floor*, reported as
    ``teacher_student/noise_floor`` (and the validation set's exact one as
    ``teacher_student/val_noise_floor``, with ``teacher_student/excess_loss`` = val_loss minus
    it). Every batch is fresh data, so the gap to the floor is optimisation error and SGD noise,
    which is what learning-rate decay removes.

    Args:
        in_dim: input features.
        out_dim: regression targets.
        teacher_hidden: teacher width (its capacity sets the problem's difficulty).
        hidden: student width (times ``scale``).
        depth: student hidden layers.
        noise_std: label noise standard deviation (> 0 keeps a visible floor).
        val_size: validation samples (times ``scale``).
        data_seed: seed of the teacher and the validation set (the problem itself).
        **base: ``seed`` (the trial's: student init, batch stream), ``device`` and ``scale``
            (1 for CI on CPUs, larger for a GPU): see :class:`~ray_metaopt.training.tasks.Task`.

    Example:
        >>> task = TeacherStudentTask(noise_std=0.1, seed=1, device="cpu")
        >>> model = task.build_model()
        >>> task.training_step(model, batch_size=32).loss.backward()
    """

    def __init__(
        self,
        *,
        in_dim: int = 16,
        out_dim: int = 1,
        teacher_hidden: int = 16,
        hidden: int = 64,
        depth: int = 2,
        noise_std: float = 0.1,
        val_size: int = 1024,
        data_seed: int = 0,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        self.in_dim = check_int("in_dim", in_dim, minimum=1)
        self.out_dim = check_int("out_dim", out_dim, minimum=1)
        self.teacher_hidden = check_int("teacher_hidden", teacher_hidden, minimum=1)
        self.hidden = check_int("hidden", hidden, minimum=1) * self.scale
        self.depth = check_int("depth", depth, minimum=1)
        self.noise_std = check_range("noise_std", noise_std, 0.0, 1e3)
        self.val_size = check_int("val_size", val_size, minimum=1) * self.scale
        self.data_seed = check_int("data_seed", data_seed, minimum=0)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.data_seed)
            self.teacher = _mlp(self.in_dim, self.teacher_hidden, self.out_dim, 2, nn.Tanh)
            for p in self.teacher.parameters():  # unit-scale weights: a clearly non-linear target
                nn.init.normal_(p, std=1.0 / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1 else 0.1)
            self.teacher.requires_grad_(False)
            val_gen = torch.Generator().manual_seed(self.data_seed + 1)
            x_val, y_val, noise_val = self._sample(self.val_size, val_gen)
        self.teacher.to(self.device)
        self.x_val, self.y_val = x_val.to(self.device), y_val.to(self.device)
        self.val_noise_floor = float(noise_val.pow(2).mean())

    @torch.no_grad()
    def _sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.randn(n, self.in_dim, generator=generator)
        noise = self.noise_std * torch.randn(n, self.out_dim, generator=generator)
        return x, self.teacher(x) + noise, noise  # called before the teacher moves to the device

    def build_model(self) -> nn.Module:
        with self.seeded():
            return _mlp(self.in_dim, self.hidden, self.out_dim, self.depth, nn.ReLU).to(self.device)

    def training_step(self, model: nn.Module, batch_size: int) -> TaskStep:
        x = torch.randn(batch_size, self.in_dim, generator=self.generator).to(self.device, non_blocking=True)
        noise = (self.noise_std * torch.randn(batch_size, self.out_dim, generator=self.generator)).to(
            self.device, non_blocking=True
        )
        with torch.no_grad():
            y = self.teacher(x) + noise
        return TaskStep(loss=nn.functional.mse_loss(model(x), y))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        val_loss = float(nn.functional.mse_loss(model(self.x_val), self.y_val))
        return {"val_loss": val_loss, "excess_loss": val_loss - self.val_noise_floor}

    def info(self) -> dict[str, float]:
        return {"noise_floor": self.noise_std**2, "val_noise_floor": self.val_noise_floor}
