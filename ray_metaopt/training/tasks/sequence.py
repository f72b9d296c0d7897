"""A small recurrent sequence model on a synthetic memory task."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..._validation import check_int
from .base import Task, TaskStep


class _GRUTagger(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = nn.GRU(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out)


class SequenceTask(Task):
    """GRU tagger for a delayed modular sum: ``y[t] = (x[t] + x[t - delay]) mod vocab``.

    Tokens are uniform over ``vocab``; positions ``t < delay`` are not scored. The model must
    carry the last ``delay`` tokens in its state, so loss curves have the long plateau before the
    memory forms that recurrent models are known for. The target is deterministic (floor 0);
    chance level is ``log(vocab)``, reported as ``sequence/chance_loss``. Reports
    ``sequence/val_accuracy`` (per scored token).

    Args:
        vocab: number of token values.
        seq_len: sequence length (> delay).
        delay: how far back the second summand is.
        embed: embedding width.
        hidden: GRU width (times ``scale``).
        layers: GRU layers.
        val_size: validation sequences (times ``scale``).
        data_seed: seed of the validation set.
        **base: ``seed`` (the trial's: init, batch stream), ``device`` and ``scale``
            (1 for CI on CPUs, larger for a GPU): see :class:`~ray_metaopt.training.tasks.Task`.

    Example:
        >>> task = SequenceTask(delay=2, seed=0, device="cpu")
        >>> step = task.training_step(task.build_model(), batch_size=8)
        >>> step.loss.backward()
    """

    def __init__(
        self,
        *,
        vocab: int = 8,
        seq_len: int = 16,
        delay: int = 2,
        embed: int = 16,
        hidden: int = 48,
        layers: int = 1,
        val_size: int = 512,
        data_seed: int = 0,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        self.vocab = check_int("vocab", vocab, minimum=2)
        self.delay = check_int("delay", delay, minimum=1)
        self.seq_len = check_int("seq_len", seq_len, minimum=self.delay + 1)
        self.embed = check_int("embed", embed, minimum=1)
        self.hidden = check_int("hidden", hidden, minimum=1) * self.scale
        self.layers = check_int("layers", layers, minimum=1)
        self.val_size = check_int("val_size", val_size, minimum=1) * self.scale
        self.data_seed = check_int("data_seed", data_seed, minimum=0)
        x_val, y_val = self._sample(self.val_size, torch.Generator().manual_seed(self.data_seed))
        self.x_val, self.y_val = x_val.to(self.device), y_val.to(self.device)

    def _sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(self.vocab, (n, self.seq_len), generator=generator)
        y = (x[:, self.delay :] + x[:, : -self.delay]) % self.vocab
        return x, y

    def _loss_and_logits(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)[:, self.delay :]
        return nn.functional.cross_entropy(logits.reshape(-1, self.vocab), y.reshape(-1)), logits

    def build_model(self) -> nn.Module:
        with self.seeded():
            return _GRUTagger(self.vocab, self.embed, self.hidden, self.layers).to(self.device)

    def training_step(self, model: nn.Module, batch_size: int) -> TaskStep:
        x, y = self._sample(batch_size, self.generator)
        loss, _ = self._loss_and_logits(model, x.to(self.device), y.to(self.device))
        return TaskStep(loss=loss)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        loss, logits = self._loss_and_logits(model, self.x_val, self.y_val)
        accuracy = (logits.argmax(dim=-1) == self.y_val).float().mean()
        return {"val_loss": float(loss), "val_accuracy": float(accuracy)}

    def info(self) -> dict[str, float]:
        return {"chance_loss": float(torch.log(torch.tensor(float(self.vocab))))}
