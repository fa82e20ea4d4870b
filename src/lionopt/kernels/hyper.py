"""The hyperparameters of one Lion step (``LionHyper``), shared by every implementation, and
small helpers of the math (cautious scale, low-precision test)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

#: Cautious Lion divides the masked update by mean(mask), clamped at this floor, as in the
#: Cautious Optimizers paper's reference code (arXiv 2411.16085).
CAUTIOUS_MEAN_FLOOR = 1e-3

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LionHyper:
    """Hyperparameters of one Lion step over a list of tensors.

    ``lr`` is one float for every tensor, or one float per tensor (Tiger's per-tensor lr).
    """

    lr: float | Sequence[float]
    beta1: float
    beta2: float
    weight_decay: float
    maximize: bool = False
    cautious: bool = False
    cautious_weight_decay: bool = False
    #: One 32-bit key per tensor: stochastic rounding of bf16 parameters (``kernels.rounding``).
    #: None: round to nearest.
    rounding_keys: Sequence[int] | None = None

    def keys(self, count: int) -> Sequence[int | None]:
        """Each tensor's rounding key, or None for every tensor when rounding to nearest."""
        if self.rounding_keys is None:
            return [None] * count
        if len(self.rounding_keys) != count:
            raise ValueError(f"Expected {count} rounding keys, got {len(self.rounding_keys)}")
        return self.rounding_keys

    def lrs(self, count: int) -> Sequence[float]:
        if isinstance(self.lr, (int, float)):
            return [float(self.lr)] * count
        if len(self.lr) != count:
            raise ValueError(f"Expected {count} learning rates, got {len(self.lr)}")
        return self.lr

    def subset(self, indices: Sequence[int], count: int) -> LionHyper:
        """These hyperparameters for the tensors at ``indices`` of a list of ``count``."""
        if isinstance(self.lr, (int, float, Tensor)) and self.rounding_keys is None:
            return self
        lrs = (
            self.lr if isinstance(self.lr, (int, float, Tensor)) else [self.lr[i] for i in indices]
        )
        keys = self.rounding_keys
        return replace(
            self, lr=lrs, rounding_keys=None if keys is None else [keys[i] for i in indices]
        )

    def one(self, index: int, count: int) -> LionHyper:
        """These hyperparameters for the one tensor at ``index`` (a float lr)."""
        keys = self.rounding_keys
        return replace(
            self,
            lr=self.lrs(count)[index],
            rounding_keys=None if keys is None else [keys[index]],
        )

    @property
    def uniform_lr(self) -> float | None:
        """The lr shared by every tensor, or None when lrs differ per tensor."""
        if isinstance(self.lr, (int, float)):
            return float(self.lr)
        first = self.lr[0] if len(self.lr) else 0.0
        return float(first) if all(lr == first for lr in self.lr) else None


def is_low_precision(tensor: Tensor) -> bool:
    return tensor.dtype in _LOW_PRECISION


def cautious_scale(agree: Tensor, stats=None) -> Tensor:
    """1 / mean(agree), with the mean clamped away from 0 (a 0-dim tensor, no host sync).

    ``stats`` (a ``kernels.group.LocalStats`` or a subclass) takes the mean over the whole
    tensor; None: ``agree.mean()``.
    """
    mean = agree.mean() if stats is None else stats.mean(agree)
    return mean.clamp(min=CAUTIOUS_MEAN_FLOOR).reciprocal()
