"""MNIST-1D (Greydanus 2020), generated procedurally by the ``mnist1d`` package, with a 1-D CNN.

Nothing is downloaded: :func:`mnist1d.data.make_dataset` builds the data set from its ten 1-D
digit templates (padding, shear, translation, correlated and i.i.d. noise) with the package's
default arguments (5,000 signals of length 40, 4,000 train / 1,000 test, generator seed 42),
the standard MNIST-1D. (The package's ``get_dataset`` would download a pickle; it is not used.)
"""

from __future__ import annotations

import functools

from typing import Any

import torch
from torch import nn

from ..._validation import check_int, check_range
from .base import ArrayClassificationTask, Throughput

EXTRA_HINT = "pip install 'ray_metaopt[tasks]' (or pip install mnist1d)"


@functools.lru_cache(maxsize=1)
def _generate() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        import numpy as np
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise ImportError(f"the 'mnist1d' task needs the mnist1d package, which generates the data set: {EXTRA_HINT}") from exc
    state = np.random.get_state()  # make_dataset seeds numpy's global RNG: leave it as it was
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)[:, None, :]  # noqa: E731  (N, 1 channel, 40)
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(data["x"]), as_y(data["y"]), as_x(data["x_test"]), as_y(data["y_test"])


def mnist1d_arrays() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of the standard MNIST-1D; x is ``(N, 1, 40)``.

    Raises:
        ImportError: the ``mnist1d`` package (extra ``[tasks]``) is not installed.
    """
    return tuple(t.clone() for t in _generate())  # type: ignore[return-value]


class _CNN1d(nn.Module):
    def __init__(self, length: int, channels: int, depth: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 1
        for _ in range(depth):
            layers += [nn.Conv1d(width, channels, kernel_size=5, stride=2, padding=1), nn.ReLU()]
            width = channels
            length = (length + 2 - 5) // 2 + 1
        if length < 1:
            raise ValueError(f"depth={depth} strided convolutions leave no signal of length 40")
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class MNIST1DTask(ArrayClassificationTask):
    """MNIST-1D classification with a small 1-D CNN (the paper's: strided 5-wide convolutions).

    Train and validation sets are the data set's own train and test parts (4,000 / 1,000
    signals); training batches are drawn with replacement from the training part. Reports
    ``mnist1d/val_accuracy`` and ``mnist1d/samples_per_s`` (training throughput since the last
    evaluation). The paper's CNN reaches about 94% test accuracy; an MLP about 68%.

    Args:
        channels: convolution channels (times ``scale``).
        depth: strided convolution layers (1 to 4).
        label_smoothing: label smoothing of the training loss (validation loss has none).
        **base: ``seed`` (the trial's: init, batch order), ``device`` and ``scale``
            (1 for CI on CPUs, larger for a GPU): see :class:`~ray_metaopt.training.tasks.Task`.

    Raises:
        ImportError: the ``mnist1d`` package (extra ``[tasks]``) is not installed.
    """

    num_classes = 10

    def __init__(
        self,
        *,
        channels: int = 32,
        depth: int = 3,
        label_smoothing: float = 0.0,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        self.channels = check_int("channels", channels, minimum=1) * self.scale
        self.depth = check_int("depth", depth, minimum=1)
        if self.depth > 4:
            raise ValueError(f"depth must be at most 4 (each layer halves the length-40 signal), got depth={depth}")
        self.label_smoothing = check_range("label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)
        x_train, y_train, x_val, y_val = mnist1d_arrays()
        self.x_train, self.y_train = x_train.to(self.device), y_train.to(self.device)
        self.x_val, self.y_val = x_val.to(self.device), y_val.to(self.device)
        self.throughput = Throughput()

    def build_model(self) -> nn.Module:
        with self.seeded():
            model = _CNN1d(self.x_train.shape[-1], self.channels, self.depth, self.num_classes)
        return model.to(self.device)
