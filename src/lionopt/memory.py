"""Optimizer-state accounting: bytes per parameter, and the largest model a memory budget holds.

``state_bytes(optimizer)`` sums the bytes of every tensor in ``optimizer.state`` (each storage
counted once), so it measures what an optimizer really keeps (padding, scales and step
counters included), for Lion or any ``torch.optim`` optimizer. State is created lazily: take
one step first. Measured on a GPT-like model (see ``benchmarks/momentum_dtypes.py``):
AdamW 8, Lion fp32 4, bf16 2, 8-bit 1.016 bytes per parameter.
"""

from __future__ import annotations

from torch import Tensor
from torch.optim import Optimizer

__all__ = ["bytes_per_param", "max_params", "param_count", "state_bytes"]

GIB = 1024**3


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes held by the tensors in ``optimizer.state``, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for state in optimizer.state.values():
        for entry in state.values():
            # a list of tensors: e.g. the per-worker momenta of a simulated Distributed Lion
            values = entry if isinstance(entry, (list, tuple)) else (entry,)
            for value in values:
                if not isinstance(value, Tensor):
                    continue
                storage = value.untyped_storage()
                if storage.data_ptr() in seen:
                    continue
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def param_count(optimizer: Optimizer) -> int:
    """Number of parameter elements the optimizer updates (each tensor counted once)."""
    params = {id(p): p for group in optimizer.param_groups for p in group["params"]}
    return sum(p.numel() for p in params.values())


def bytes_per_param(optimizer: Optimizer) -> float:
    """``state_bytes / param_count``; AdamW's is 8 (two fp32 moments)."""
    return state_bytes(optimizer) / param_count(optimizer)


def max_params(budget_bytes: float, weight_bytes: float, state_bytes_per_param: float) -> int:
    """Largest parameter count whose weights, gradients and optimizer state fit the budget.

    ``N = budget / (weight_bytes + grad_bytes + state_bytes_per_param)`` with gradients in the
    weights' dtype (``grad_bytes = weight_bytes``). Activations, buffers and the allocator's
    slack are not counted: this is an upper bound.
    """
    return int(budget_bytes // (2 * weight_bytes + state_bytes_per_param))
