"""``TensorGroup``: the one argument every step body and backend takes, and ``LocalStats``.

``lionopt.functional.group_tensors`` cuts a step's tensors into groups of one device, one
(param, grad, momentum) dtype triple and one momentum kind; each group is stepped by one
implementation (single-tensor, multi-tensor or a fused backend).

Whole-tensor statistics go through ``group.stats``: Tiger's RMS and non-finite guard, cautious
Lion's mask mean, the diagnostics. ``LocalStats`` computes them on the tensors as they are,
which is right when each process holds whole tensors. Where a tensor is sharded (FSDP2's local
shards), a subclass reduces the same figures over the mesh and sets ``local = False``; groups
with non-local stats are not given to fused kernels when a statistic is needed inside the
kernel (cautious Lion), because the kernels compute theirs locally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lionopt.state.formats import PLAIN_KIND

__all__ = ["LOCAL_STATS", "LocalStats", "TensorGroup"]


class LocalStats:
    """Whole-tensor statistics of tensors held whole by this process."""

    #: False for an implementation that reduces over a device mesh (the fused kernels cannot
    #: use it for statistics they take inside the kernel).
    local = True

    def numel(self, tensor: Tensor) -> int:
        """The number of elements of the whole tensor."""
        return tensor.numel()

    def mean(self, tensor: Tensor) -> Tensor:
        """The mean over the whole tensor (0-dim, no host sync)."""
        return tensor.mean()

    def norms(
        self, tensors: list[Tensor], ord: float, dtype: torch.dtype | None = None
    ) -> list[Tensor]:
        """Each whole tensor's ``ord``-norm (2 or inf), one 0-dim tensor each."""
        return list(torch._foreach_norm(tensors, ord, dtype=dtype))

    def rms(self, tensors: list[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
        """Each whole tensor's root mean square (fp32 accumulation where ``dtype`` says)."""
        norms = self.norms(tensors, 2, dtype=dtype)
        return [n / math.sqrt(max(self.numel(t), 1)) for n, t in zip(norms, tensors, strict=True)]

    def row_rms(self, tensor: Tensor) -> Tensor:
        """RMS over the last dim (embedding rows), keepdim."""
        return tensor.square().mean(dim=-1, keepdim=True).sqrt()


LOCAL_STATS = LocalStats()


@dataclass(eq=False)
class TensorGroup:
    """Parallel lists of one device, dtype triple and momentum kind.

    ``momenta``: the momentum tensors (int8 codes, flat and padded, for 8-bit storage);
    ``scales``: the 8-bit block scales, or None for a plain momentum. ``indices``: the
    positions of these tensors in the caller's lists (to pick per-tensor lrs and keys).
    ``fusable``: False routes the group away from fused backends (for tensors a kernel must
    not see, e.g. distributed shards whose statistics need a reduction).
    """

    params: list[Tensor]
    grads: list[Tensor]
    momenta: list[Tensor]
    kind: str = PLAIN_KIND
    scales: list[Tensor] | None = None
    indices: list[int] = field(default_factory=list)
    stats: LocalStats = LOCAL_STATS
    fusable: bool = True

    def __len__(self) -> int:
        return len(self.params)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def device_type(self) -> str:
        return self.params[0].device.type

    @property
    def param_dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def momentum_dtype(self) -> torch.dtype:
        return self.momenta[0].dtype
