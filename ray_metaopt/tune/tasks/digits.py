"""Classification of scikit-learn's bundled 8x8 handwritten digits (no download at run time)."""

from __future__ import annotations

import torch
from torch import nn

from ..._validation import check_int, check_range
from .base import Task, TaskStep, check_scale


def load_digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 digits as ``(features in [0, 1], labels)`` tensors, from scikit-learn's package data."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # sklearn is an optional extra
        raise ImportError(
            "the 'digits' task needs scikit-learn, which ships the data set: "
            "pip install 'ray_metaopt[tasks]' (or pip install scikit-learn)"
        ) from exc
    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target, dtype=torch.long)


class DigitsTask(Task):
    """MLP classifier on scikit-learn's digits (1,797 8x8 images, 10 classes).

    A small real data set with a fixed train/validation split (by ``data_seed``): training
    batches are drawn with replacement from the training part, so long runs overfit and
    ``val_loss`` turns up, which is what weight decay and lr cuts are for. Reports
    ``digits/val_accuracy``.

    Args:
        hidden: hidden width (times ``scale``).
        depth: hidden layers.
        dropout: dropout after each hidden layer (0 disables it).
        val_fraction: share of the images held out for validation.
        scale: size knob: 1 for CI on CPUs, larger for a GPU.
        data_seed: seed of the train/validation split.
        seed: the trial's seed (init, batch order, dropout).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Example:
        >>> task = DigitsTask(seed=0, device="cpu")
        >>> task.evaluate(task.build_model())["val_accuracy"] < 0.5
        True
    """

    num_classes = 10

    def __init__(
        self,
        *,
        hidden: int = 64,
        depth: int = 1,
        dropout: float = 0.0,
        val_fraction: float = 0.25,
        scale: int = 1,
        data_seed: int = 0,
        seed: int = 0,
        device: str | torch.device | None = "auto",
    ) -> None:
        super().__init__(seed=seed, device=device)
        self.scale = check_scale(scale)
        self.hidden = check_int("hidden", hidden, minimum=1) * self.scale
        self.depth = check_int("depth", depth, minimum=1)
        self.dropout = check_range("dropout", dropout, 0.0, 1.0, high_open=True)
        self.val_fraction = check_range("val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        self.data_seed = check_int("data_seed", data_seed, minimum=0)
        x, y = load_digits_arrays()
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.data_seed))
        n_val = max(1, int(round(self.val_fraction * len(y))))
        val, train = order[:n_val], order[n_val:]
        self.x_train, self.y_train = x[train].to(self.device), y[train].to(self.device)
        self.x_val, self.y_val = x[val].to(self.device), y[val].to(self.device)

    def build_model(self) -> nn.Module:
        layers: list[nn.Module] = []
        width = self.x_train.shape[1]
        with self.seeded():
            for _ in range(self.depth):
                layers += [nn.Linear(width, self.hidden), nn.ReLU()]
                if self.dropout > 0:
                    layers.append(nn.Dropout(self.dropout))
                width = self.hidden
            layers.append(nn.Linear(width, self.num_classes))
        return nn.Sequential(*layers).to(self.device)

    def training_step(self, model: nn.Module, batch_size: int) -> TaskStep:
        idx = torch.randint(len(self.y_train), (batch_size,), generator=self.generator).to(self.device)
        return TaskStep(loss=nn.functional.cross_entropy(model(self.x_train[idx]), self.y_train[idx]))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        logits = model(self.x_val)
        return {
            "val_loss": float(nn.functional.cross_entropy(logits, self.y_val)),
            "val_accuracy": float((logits.argmax(dim=1) == self.y_val).float().mean()),
        }

    def info(self) -> dict[str, float]:
        return {"train_size": float(len(self.y_train)), "val_size": float(len(self.y_val))}
