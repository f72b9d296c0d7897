"""Classification of scikit-learn's bundled 8x8 handwritten digits (no download at run time)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..._validation import check_int, check_range
from .base import ArrayClassificationTask, Throughput


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


def split_indices(n: int, val_fraction: float, data_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, val)`` indices: a random split of ``range(n)`` by ``data_seed``, disjoint."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(data_seed))
    n_val = max(1, int(round(val_fraction * n)))
    return order[n_val:], order[:n_val]


class _DigitsSplit(ArrayClassificationTask):
    """scikit-learn's digits split into train/validation by ``data_seed``, shared by
    :class:`DigitsTask` and :class:`DigitsCNNTask`, which each add a model."""

    num_classes = 10

    def __init__(
        self, *, dropout: float = 0.0, val_fraction: float = 0.25, data_seed: int = 0, **base: Any
    ) -> None:
        super().__init__(**base)
        self.dropout = check_range("dropout", dropout, 0.0, 1.0, high_open=True)
        self.val_fraction = check_range("val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        self.data_seed = check_int("data_seed", data_seed, minimum=0)
        x, y = load_digits_arrays()
        train, val = split_indices(len(y), self.val_fraction, self.data_seed)
        self.x_train, self.y_train = x[train].to(self.device), y[train].to(self.device)
        self.x_val, self.y_val = x[val].to(self.device), y[val].to(self.device)


class DigitsTask(_DigitsSplit):
    """MLP classifier on scikit-learn's digits (1,797 8x8 images, 10 classes).

    A small real data set with a fixed train/validation split (by ``data_seed``): training
    batches are drawn with replacement from the training part, so long runs overfit and
    ``val_loss`` turns up, which is what weight decay and lr cuts are for. Reports
    ``digits/val_accuracy``.

    Args:
        hidden: hidden width (times ``scale``).
        depth: hidden layers.
        **split: ``dropout`` (after each hidden layer; 0 disables it), ``val_fraction`` (share of
            the images held out for validation), ``data_seed`` (seed of the train/validation
            split), and the :class:`~ray_metaopt.training.tasks.Task` arguments ``seed`` (the
            trial's: init, batch order, dropout), ``device`` and ``scale`` (1 for CI on CPUs,
            larger for a GPU).

    Example:
        >>> task = DigitsTask(seed=0, device="cpu")
        >>> task.evaluate(task.build_model())["val_accuracy"] < 0.5
        True
    """

    def __init__(self, *, hidden: int = 64, depth: int = 1, **split: Any) -> None:
        super().__init__(**split)
        self.hidden = check_int("hidden", hidden, minimum=1) * self.scale
        self.depth = check_int("depth", depth, minimum=1)

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


class _DigitsCNN(nn.Module):
    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(2 * channels * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x.view(-1, 1, 8, 8)).flatten(1)))


class DigitsCNNTask(_DigitsSplit):
    """A small 2-D CNN on scikit-learn's 8x8 digits (same data and split as :class:`DigitsTask`).

    Two 3x3 convolutions (``channels`` and ``2 * channels``), a 2x2 max-pool and a linear head.
    Reports ``digits_cnn/val_accuracy`` and ``digits_cnn/samples_per_s`` (training throughput
    since the last evaluation).

    Args:
        channels: channels of the first convolution (times ``scale``).
        **split: as for :class:`DigitsTask` (``dropout`` here is before the head).

    Example:
        >>> task = DigitsCNNTask(seed=0, device="cpu")
        >>> task.training_step(task.build_model(), batch_size=8).loss.backward()
    """

    def __init__(self, *, channels: int = 16, **split: Any) -> None:
        super().__init__(**split)
        self.channels = check_int("channels", channels, minimum=1) * self.scale
        self.throughput = Throughput()

    def build_model(self) -> nn.Module:
        with self.seeded():
            model = _DigitsCNN(self.channels, self.num_classes, self.dropout)
        return model.to(self.device)
