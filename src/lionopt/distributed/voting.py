"""Vote codecs for Distributed Lion: how signs and vote counts are packed into bytes.

A *sign code* is ``s + 1`` (0, 1, 2 for −1, 0, +1) packed 2 bits an element, or, where no rank
has an exact zero in a bucket, ``s > 0`` packed 1 bit an element. Elements are packed
little-endian inside a byte: element ``i`` of a width-``w`` buffer lives in byte ``i*w // 8`` at
bit ``(i*w) % 8``. Width 8 means a signed int8 value, not a code.

A *result format* ``(width, mul, add)`` says how a rank's count of votes ``S = Σ_i s_i`` is sent
in the packed transport's second phase: a code ``q`` of ``width`` bits decodes to
``v = q*mul + add``; width 8 carries ``v`` itself as int8. The majority vote needs only
``sign(S)``; the average vote needs ``S``.

These are the torch reference implementations; the fused kernels write and read the same
layouts (``lionopt.kernels.cpu.signpack`` and ``lionopt.kernels.triton.signpack``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ResultFormat",
    "count_votes",
    "decode",
    "encode_result",
    "pack",
    "result_format",
    "sign_codes",
    "unpack",
]

#: The element alignment of every bucket slice: a byte of 1-bit codes holds 8 elements.
ALIGN = 8


@dataclass(frozen=True)
class ResultFormat:
    """A packed vote: code ``q`` of ``width`` bits means ``q*mul + add`` (width 8: int8 itself)."""

    width: int
    mul: int = 1
    add: int = 0


#: The 2-bit sign codes a rank's pass 1 emits: q − 1 is the sign.
SIGN2 = ResultFormat(2, 1, -1)
#: The 1-bit sign codes used where no zero has to be carried: 2q − 1 is the sign.
SIGN1 = ResultFormat(1, 2, -1)
#: Raw int8 values (the int8 transport's sums, or counted all_gather votes).
RAW8 = ResultFormat(8, 1, 0)


def sign_codes(signs: Tensor, width: int) -> Tensor:
    """int8 signs (−1, 0, 1) as unpacked uint8 codes of ``width`` 1 or 2 (1: zeros become −1)."""
    if width == 2:
        return (signs + 1).to(torch.uint8)
    return (signs > 0).to(torch.uint8)


def pack(codes: Tensor, width: int) -> Tensor:
    """Pack uint8 codes (each < 2**width) of a length that is a multiple of 8/width."""
    if width == 8:
        return codes
    per_byte = 8 // width
    grid = codes.view(-1, per_byte).to(torch.int32)
    shifts = torch.arange(0, 8, width, dtype=torch.int32, device=codes.device)
    return (grid << shifts).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack(packed: Tensor, width: int) -> Tensor:
    """The uint8 codes of a packed buffer (8/width codes a byte)."""
    if width == 8:
        return packed
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=packed.device)
    return ((packed.view(-1, 1) >> shifts) & ((1 << width) - 1)).reshape(-1)


def decode(packed: Tensor, fmt: ResultFormat) -> Tensor:
    """The int32 values ``q*mul + add`` of a packed buffer (width 8: the int8 values)."""
    if fmt.width == 8:
        return packed.view(torch.int8).to(torch.int32)
    return unpack(packed, fmt.width).to(torch.int32) * fmt.mul + fmt.add


def count_votes(gathered: Tensor, fmt: ResultFormat) -> Tensor:
    """S = Σ_i s_i (int32) from ``(ranks, bytes)`` packed sign codes of format ``fmt``."""
    return decode(gathered.reshape(-1), fmt).view(gathered.shape[0], -1).sum(0, dtype=torch.int32)


def result_format(vote: str, ranks: int, zeros: bool) -> ResultFormat:
    """The narrowest exact format for the vote over ``ranks`` ranks (``zeros``: some s_i = 0).

    Without zeros every S has the parity of ``ranks``; the majority vote of an odd number of
    nonzero signs is never a tie, so one bit carries it.
    """
    if vote == "majority":
        return SIGN1 if (ranks % 2 == 1 and not zeros) else SIGN2
    if zeros:  # S in [-N, N]: code S + N
        values, fmt = 2 * ranks + 1, (1, -ranks)
    else:  # S = 2q - N, q in [0, N]
        values, fmt = ranks + 1, (2, -ranks)
    for width in (1, 2, 4):
        if values <= 1 << width:
            return ResultFormat(width, *fmt)
    return RAW8


def encode_result(counts: Tensor, vote: str, fmt: ResultFormat) -> Tensor:
    """Packed codes of the vote result for the counts S (int32) in format ``fmt``."""
    value = torch.sign(counts) if vote == "majority" else counts
    if fmt.width == 8:
        return value.to(torch.int8).view(torch.uint8)
    codes = torch.div(value - fmt.add, fmt.mul, rounding_mode="floor").to(torch.uint8)
    return pack(codes, fmt.width)


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if torch.is_complex(t) else t


def _low_precision(t: Tensor) -> bool:
    return t.dtype in (torch.bfloat16, torch.float16)


def sign_pass(
    params: list[Tensor],
    grads: list[Tensor | None],
    exp_avgs: list[Tensor],
    offsets: list[int],
    numel: int,
    beta1: float,
    beta2: float,
    width: int,
    count_zeros: bool,
) -> tuple[Tensor, int]:
    """Pass 1 in torch: each tensor's sign(β1·m + (1−β1)·g) into one bucket buffer; m updated.

    A ``None`` gradient is a zero gradient whose momentum is *not* written here (the caller
    decays it once it knows that some rank has a gradient). Returns the buffer (uint8: 2-bit
    codes, or int8 signs for ``width`` 8; padding is a zero vote) and the number of exact zeros
    among the real elements (0 unless ``count_zeros``).
    """
    signs = torch.zeros(numel, dtype=torch.int8, device=params[0].device if params else "cpu")
    zeros = 0
    for param, grad, exp_avg, offset in zip(params, grads, exp_avgs, offsets):
        param, exp_avg = _real(param), _real(exp_avg)
        low = _low_precision(param) or _low_precision(exp_avg)
        m = exp_avg.float() if low else exp_avg
        if grad is None:
            c = m * beta1
        else:
            grad = _real(grad)
            g = grad.float() if low else grad.to(param.dtype)
            c = m * beta1 + g * (1 - beta1)
            m.mul_(beta2).add_(g, alpha=1 - beta2)
            if low:
                exp_avg.copy_(m)
        s = torch.sign(c).to(torch.int8).reshape(-1)
        signs[offset : offset + s.numel()] = s
        if count_zeros:
            zeros += int((s == 0).sum())
    if width == 8:
        return signs.view(torch.uint8), zeros
    return pack((signs + 1).view(torch.uint8), 2), zeros


def apply_pass(
    params: list[Tensor],
    offsets: list[int],
    lrs: list[float],
    weight_decays: list[float],
    packed: Tensor,
    fmt: ResultFormat,
    vote: str,
    ranks: int,
) -> None:
    """Pass 2 in torch: θ ← θ·(1−η·λ) − η·u, u = sign(v) (majority) or v/N (average)."""
    values = decode(packed, fmt)
    for param, offset, lr, weight_decay in zip(params, offsets, lrs, weight_decays):
        real = _real(param)
        low = _low_precision(real)
        theta = real.float() if low else real
        v = values[offset : offset + real.numel()].view(real.shape)
        update = torch.sign(v).to(theta.dtype) if vote == "majority" else v.to(theta.dtype) / ranks
        if weight_decay != 0:
            theta.mul_(1 - lr * weight_decay)
        theta.add_(update, alpha=-lr)
        if low:
            real.copy_(theta)
