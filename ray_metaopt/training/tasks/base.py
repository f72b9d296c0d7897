"""The :class:`Task` interface: what the provided trainable trains, and how it measures it.

A task owns its data (generated or bundled, never downloaded), builds the model and its param
groups on a device, produces one training loss per step with the per-step metrics a
meta-optimizer reads, and evaluates on a fixed validation set.
"""

from __future__ import annotations

import abc
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch

from ..._validation import check_int


@dataclass
class TaskStep:
    """One training step's output.

    Args:
        loss: the scalar training loss, still attached to the graph (the trainable calls
            ``backward``).
        metrics: extra per-step metrics for the meta-optimizer (one-element tensors or numbers,
            named with the vocabulary of ``docs/ARCHITECTURE.md``, e.g. ``routing_entropy``).
            Tensors are not read on the host until a decision step.
    """

    loss: torch.Tensor
    metrics: Mapping[str, Any] = field(default_factory=dict)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device a trial trains on.

    ``"auto"``/``None``: CUDA when torch can use it and (inside a Ray worker) Ray assigned this
    worker a GPU, else CPU. Ray hands trials fake GPU ids on a machine without CUDA (for example
    ``ray.init(num_gpus=4)`` on a laptop): those trials run on CPU.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device not in (None, "auto"):
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device={str(device)!r} but torch sees no CUDA device; use device='auto' to fall back to CPU"
            )
        return device
    if not torch.cuda.is_available():
        return torch.device("cpu")
    try:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            # Inside a trial (an actor) whose resources hold no GPU: don't take one.
            if context.get_actor_id() is not None and not context.get_accelerator_ids().get("GPU"):
                return torch.device("cpu")
    except (ImportError, AttributeError, RuntimeError):  # no Ray / no runtime context: torch decides
        pass
    return torch.device("cuda")


class Task(abc.ABC):
    """A training problem for :func:`~ray_metaopt.tune.metaopt_trainable`.

    Subclasses take their configuration as keyword arguments (the trial's ``task_config``) plus
    ``seed`` and ``device``, validate them in ``__init__`` and build their fixed data there.
    ``seed`` drives model initialisation and the training-batch stream; problem-defining data
    (teacher weights, validation set, train/val split) depends on ``data_seed`` only, so trials
    with different seeds solve the same problem.

    Args:
        seed: the trial's seed (model init, batch order).
        device: where the model and batches live (``"auto"`` picks CUDA when visible).
        scale: size multiplier (>= 1) for tasks that have one: 1 is the CI size on CPUs, larger
            for a GPU; every built-in task reads it, a task of your own may ignore it.

    Example:
        >>> class Line(Task):
        ...     def build_model(self):
        ...         with self.seeded():
        ...             return torch.nn.Linear(1, 1).to(self.device)
        ...     def training_step(self, model, batch_size):
        ...         x = torch.randn(batch_size, 1, generator=self.generator).to(self.device)
        ...         return TaskStep(loss=(model(x) - 2 * x).pow(2).mean())
        ...     def evaluate(self, model):
        ...         x = torch.linspace(-1, 1, 64, device=self.device)[:, None]
        ...         return {"val_loss": float((model(x) - 2 * x).pow(2).mean())}
    """

    def __init__(self, *, seed: int = 0, device: str | torch.device | None = "auto", scale: int = 1) -> None:
        self.seed = check_int("seed", seed, minimum=0)
        self.device = resolve_device(device)
        self.scale = check_int("scale", scale, minimum=1)
        # The training-batch stream; its state is checkpointed so a resumed trial sees the
        # same batches as an uninterrupted one. CPU generator: identical streams on CPU and GPU.
        self.generator = torch.Generator().manual_seed(self.seed)

    # ------------------------------------------------------------------ model
    @abc.abstractmethod
    def build_model(self) -> torch.nn.Module:
        """A freshly initialised model on :attr:`device` (use :meth:`seeded` for determinism)."""

    def param_groups(self, model: torch.nn.Module, *, lr: float, weight_decay: float | None) -> list[dict]:
        """Param groups for the optimizer, each with ``name`` (and ``role`` where it applies).

        Default: ``"decay"`` (matrices, embeddings) with ``weight_decay`` and ``"no_decay"``
        (biases, norm scales) with none, the usual AdamW practice. ``weight_decay=None`` leaves
        the optimizer's default on both groups.
        """
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "name": "decay", "lr": lr}]
        if weight_decay is not None:
            groups[0]["weight_decay"] = weight_decay
        if no_decay:
            groups.append({"params": no_decay, "name": "no_decay", "lr": lr})
            if weight_decay is not None:
                groups[1]["weight_decay"] = 0.0
        return [g for g in groups if g["params"]]

    @contextlib.contextmanager
    def seeded(self, offset: int = 0) -> Iterator[None]:
        """Run a block under torch's global RNG seeded with ``seed + offset``, restoring it after."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + offset)
            yield

    # ------------------------------------------------------------------ training
    @abc.abstractmethod
    def training_step(self, model: torch.nn.Module, batch_size: int) -> TaskStep:
        """Draw the next training batch from :attr:`generator` and return its loss and metrics."""

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Metrics on the fixed validation set (the model is in eval mode, without grad).

        Must contain ``val_loss``; other keys are reported as ``<task name>/<key>``.
        """

    def info(self) -> dict[str, float]:
        """Constant facts about the problem reported with every result (e.g. its noise floor)."""
        return {}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The batch stream's position (loads with ``torch.load(..., weights_only=True)``)."""
        return {"type": type(self).__name__, "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("type") != type(self).__name__:
            raise ValueError(
                f"task state is for {state.get('type')!r}, cannot load it into {type(self).__name__}"
            )
        self.generator.set_state(state["generator"])


class Throughput:
    """Training throughput between evaluations, for tasks to report (``samples_per_s``...).

    A task calls :meth:`count` in ``training_step`` with the samples (and tokens) it drew and
    :meth:`read` in ``evaluate``: the rates are over the wall time since the previous
    :meth:`read` (or the first :meth:`count`), so they include backward, the optimizer and the
    meta-optimizer, not just the forward pass. Before any step both rates read 0.0. Wall-clock
    based: not part of what a seed determines.

    Example:
        >>> meter = Throughput()
        >>> meter.count(64, tokens=64 * 128)
        >>> sorted(meter.read())
        ['samples_per_s', 'tokens_per_s']
    """

    def __init__(self) -> None:
        self._since: float | None = None
        self._samples = 0
        self._tokens = 0

    def count(self, samples: int, *, tokens: int = 0) -> None:
        if self._since is None:
            self._since = time.perf_counter()
        self._samples += samples
        self._tokens += tokens

    def read(self, *, tokens: bool = False) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = now - self._since if self._since is not None else 0.0
        rate = (lambda n: float(n / elapsed)) if elapsed > 0 else (lambda n: 0.0)
        out = {"samples_per_s": rate(self._samples)}
        if tokens:
            out["tokens_per_s"] = rate(self._tokens)
        self._since = now if self._since is not None else None
        self._samples = self._tokens = 0
        return out


class ArrayClassificationTask(Task):
    """A classifier on fixed in-memory tensors, the shared half of the built-in vision tasks.

    A subclass sets ``x_train``, ``y_train``, ``x_val``, ``y_val`` (on :attr:`device`) and
    ``num_classes`` in ``__init__`` and writes :meth:`build_model`. Training batches are drawn with
    replacement from the training part (cross-entropy, ``label_smoothing`` when set); the
    evaluation reports ``val_loss`` (no smoothing) and ``val_accuracy``, plus the training
    throughput when the subclass sets ``throughput`` to a :class:`Throughput`.
    """

    num_classes: int
    label_smoothing: float = 0.0
    throughput: Throughput | None = None

    def training_step(self, model: torch.nn.Module, batch_size: int) -> TaskStep:
        idx = torch.randint(len(self.y_train), (batch_size,), generator=self.generator).to(self.device)
        loss = torch.nn.functional.cross_entropy(
            model(self.x_train[idx]), self.y_train[idx], label_smoothing=self.label_smoothing
        )
        if self.throughput is not None:
            self.throughput.count(batch_size)
        return TaskStep(loss=loss)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        logits = model(self.x_val)
        metrics = {
            "val_loss": float(torch.nn.functional.cross_entropy(logits, self.y_val)),
            "val_accuracy": float((logits.argmax(dim=1) == self.y_val).float().mean()),
        }
        if self.throughput is not None:
            metrics.update(self.throughput.read())
        return metrics

    def info(self) -> dict[str, float]:
        return {"train_size": float(len(self.y_train)), "val_size": float(len(self.y_val))}
