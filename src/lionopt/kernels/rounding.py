"""Counter-based random bits and stochastic rounding, reproducible in torch and in C++.

Stochastic rounding needs random bits that every implementation (reference loop, foreach,
fused C++ kernel) draws identically, and that a resumed run draws again. So nothing here uses
a stateful generator: the bits of element ``i`` of a tensor are a pure function of a 32-bit
per-tensor key, and the key is a pure function of (seed, step, tensor index)::

    mix32(x)    = the 32-bit integer hash below (two multiply-xorshift rounds)
    key         = mix32(mix32(mix32(seed) ^ step) ^ index)
    bits(i)     = mix32(mix32(i) ^ key)                       # 32 uniform bits

``seed`` is a group option (default 0: runs are reproducible and every data-parallel rank
rounds identically), ``step`` the parameter's step count (saved in the state dict), ``index``
its position in the optimizer's parameter list. The momentum quantiser uses a second stream,
``momentum_key(key)``, so the two roundings are independent.

The hash's multiplier is below 2**27, so every product of a 32-bit value fits in an int64
tensor without overflow; the C++ kernel computes the same values in uint32.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "element_bits",
    "mix32",
    "momentum_key",
    "rounding_key",
    "stochastic_round_bf16",
    "store_param",
    "store_params",
]

MASK32 = 0xFFFFFFFF
_MULTIPLIER = 0x045D9F3B
_MOMENTUM_STREAM = 0x68E31DA4
_BF16_DROPPED = 0xFFFF  # the 16 low fp32 bits that bf16 drops
_BF16_KEPT = -65536  # 0xFFFF0000 as an int32


def mix32(x):
    """The 32-bit hash, on a Python int or an int64 tensor of values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MULTIPLIER) & MASK32
    x = x ^ (x >> 16)
    x = (x * _MULTIPLIER) & MASK32
    return x ^ (x >> 16)


def rounding_key(seed: int, step: int, index: int) -> int:
    """The per-tensor key of one step (see the module docstring)."""
    return mix32(mix32(mix32(seed & MASK32) ^ (step & MASK32)) ^ (index & MASK32))


def momentum_key(key: int) -> int:
    """The key of the momentum quantiser's stream, derived from a tensor's key."""
    return mix32(key ^ _MOMENTUM_STREAM)


def element_bits(numel: int, key: int, device: torch.device | str = "cpu") -> Tensor:
    """``bits(i)`` for ``i`` in ``range(numel)``, as an int64 tensor of 32-bit values."""
    index = torch.arange(numel, dtype=torch.int64, device=device)
    return mix32(mix32(index) ^ (key & MASK32))


def stochastic_round_bf16(x: Tensor, key: int, index: Tensor | None = None) -> Tensor:
    """Round fp32 ``x`` to bf16, up in magnitude with probability equal to the dropped fraction.

    Adds 16 random bits to the magnitude's low half and truncates, which is unbiased:
    E[result] = x. Values exact in bf16 never change; NaN stays NaN; the element order is
    ``x``'s logical (row-major) order. ``index``: each element's index in the whole tensor
    (int64, flat) when ``x`` is a shard of it; default ``arange(x.numel())``.
    """
    if index is None:
        bits = element_bits(x.numel(), key, x.device)
    else:
        bits = mix32(mix32(index.to(x.device)) ^ (key & MASK32))
    noise = (bits & _BF16_DROPPED).to(torch.int32)
    nan = torch.isnan(x)
    magnitude = torch.where(nan, 0, x.abs().view(torch.int32))  # no int32 overflow for NaN
    rounded = ((magnitude + noise.view(x.shape)) & _BF16_KEPT).view(torch.float32)
    return torch.where(nan, x, rounded.copysign(x)).to(torch.bfloat16)


def store_param(param: Tensor, value: Tensor, key: int | None) -> None:
    """Write fp32 ``value`` into ``param``: stochastically rounded for bf16 when ``key`` is set."""
    if key is not None and param.dtype == torch.bfloat16:
        param.copy_(stochastic_round_bf16(value, key))
    else:
        param.copy_(value)


def store_params(params: list[Tensor], values: list[Tensor], keys: list[int] | None) -> None:
    """``store_param`` over lists; one ``_foreach_copy_`` when rounding to nearest."""
    if keys is None:
        torch._foreach_copy_(params, values)
        return
    for param, value, key in zip(params, values, keys):
        store_param(param, value, key)
