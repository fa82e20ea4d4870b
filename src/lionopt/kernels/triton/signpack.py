"""Distributed Lion's two fused passes in Triton (CUDA; CPU tensors under TRITON_INTERPRET=1).

``sign_pass`` reads g and m, writes m ← β2·m + (1−β2)·g and emits the bucket's signs
sign(β1·m + (1−β1)·g) as 2-bit codes (s + 1, four a byte) or int8 signs; ``apply_pass``
decodes the vote (code q of ``width`` bits means q·mul + add; width 8 is a signed int8 value)
and applies θ ← θ·(1−η·λ) − η·u, u = sign(v) (majority) or v/N (average). The signatures and
the bits are those of the torch passes in ``lionopt.distributed.voting``, for contiguous fp32
tensors (``supports()`` declines the rest). One launch a pass covers the whole bucket: each
program takes ``BLOCK`` elements of one tensor, located through a tensor table (numel, element
offsets from the first tensor of each list, bucket offset, has-gradient flag). A tensor's
bucket offset is a multiple of 8 elements, so programs never share a byte of codes. No
autotuning (in-place kernels must run once), fp contraction off, ``tl.fma`` where ATen fuses.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except Exception as exc:  # a missing or broken triton must never break lionopt
    triton = tl = None
    _IMPORT_ERROR = exc

__all__ = ["apply_pass", "available", "sign_pass", "supports"]

BLOCK = 1024
_state: bool | None = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """Whether Triton imports and can run here (a CUDA device, or the interpreter)."""
    global _state
    if _state is None:
        try:
            if triton is None:
                raise RuntimeError(f"triton does not import: {_IMPORT_ERROR}")
            if not (_interpreting() or torch.cuda.is_available()):
                raise RuntimeError("no CUDA device")
            _state = True
        except Exception as exc:
            warnings.warn(
                f"lionopt: the Triton sign-pack kernels are not available ({exc}); "
                "using torch ops instead.",
                RuntimeWarning,
                stacklevel=2,
            )
            _state = False
    return _state


def supports(params: list[Tensor], grads: list[Tensor | None], exp_avgs: list[Tensor]) -> bool:
    """Contiguous fp32 tensors on CUDA (or CPU under the interpreter), one device."""
    if not params:
        return False
    device_types = ("cuda", "cpu") if _interpreting() else ("cuda",)
    device = params[0].device
    for p, g, m in zip(params, grads, exp_avgs):
        for t in (p, m) if g is None else (p, g, m):
            if (
                t.dtype != torch.float32
                or t.device != device
                or t.device.type not in device_types
                or not t.is_contiguous()
            ):
                return False
        if m.shape != p.shape or (g is not None and g.shape != p.shape):
            return False
    return True


def _offsets(tensors: list[Tensor | None], fallback: Tensor) -> tuple[Tensor, list[int]]:
    """The first real tensor (the base pointer) and each tensor's element offset from it."""
    base = next((t for t in tensors if t is not None), fallback)
    address, size = base.data_ptr(), base.element_size()
    return base, [0 if t is None else (t.data_ptr() - address) // size for t in tensors]


def _tables(params, offsets, device, extra_columns):
    numels = [p.numel() for p in params]
    blocks = [[i, s] for i, n in enumerate(numels) for s in range(0, -(-n // 8) * 8, BLOCK)]
    rows = [[n, off, *cols] for n, off, cols in zip(numels, offsets, extra_columns)]
    return (
        torch.tensor(rows, dtype=torch.int64, device=device),
        torch.tensor(blocks, dtype=torch.int64, device=device).reshape(-1, 2),
        len(blocks),
    )


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
    """As ``voting.sign_pass``: one launch for the bucket."""
    device = params[0].device
    out = torch.full(
        (numel if width == 8 else numel // 4,),
        0 if width == 8 else 0x55,
        dtype=torch.uint8,
        device=device,
    )
    g_base, g_offs = _offsets(grads, params[0])
    m_base, m_offs = _offsets(exp_avgs, params[0])
    columns = [
        [m_off, offset, int(g is not None)] for m_off, offset, g in zip(m_offs, offsets, grads)
    ]
    tensor_table, block_table, n_blocks = _tables(params, g_offs, device, columns)
    zeros = torch.zeros(max(n_blocks, 1), dtype=torch.int32, device=device)
    if n_blocks:
        _sign_kernel[(n_blocks,)](
            g_base, m_base, out, zeros, tensor_table, block_table,
            beta1, 1 - beta1, beta2, 1 - beta2,
            BLOCK=BLOCK, WIDTH=width, enable_fp_fusion=False,
        )  # fmt: skip
        torch.autograd.graph.increment_version(exp_avgs)
    return out, int(zeros.sum()) if count_zeros else 0


def apply_pass(
    params: list[Tensor],
    offsets: list[int],
    lrs: list[float],
    weight_decays: list[float],
    packed: Tensor,
    fmt,
    vote: str,
    ranks: int,
) -> None:
    """As ``voting.apply_pass``: one launch for the bucket's active tensors."""
    device = params[0].device
    p_base, p_offs = _offsets(params, params[0])
    tensor_table, block_table, n_blocks = _tables(
        params, p_offs, device, [[offset] for offset in offsets]
    )
    lr_table = torch.tensor(
        [[1 - lr * wd, -lr, float(wd != 0)] for lr, wd in zip(lrs, weight_decays)],
        dtype=torch.float64, device=device,
    ).to(torch.float32)  # fmt: skip
    if n_blocks:
        _apply_kernel[(n_blocks,)](
            p_base, packed.contiguous(), tensor_table, block_table, lr_table,
            fmt.mul, fmt.add, float(ranks),
            BLOCK=BLOCK, WIDTH=fmt.width, AVERAGE=vote == "average", enable_fp_fusion=False,
        )  # fmt: skip
        torch.autograd.graph.increment_version(params)


if triton is not None:

    @triton.jit
    def _sign_kernel(
        g_base, m_base, out, zeros, tensor_table, block_table,
        beta1, one_minus_beta1, beta2, one_minus_beta2,
        BLOCK: tl.constexpr, WIDTH: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        tensor = tl.load(block_table + 2 * pid)
        start = tl.load(block_table + 2 * pid + 1)
        numel = tl.load(tensor_table + 5 * tensor)
        g_off = tl.load(tensor_table + 5 * tensor + 1)
        m_off = tl.load(tensor_table + 5 * tensor + 2)
        bucket_off = tl.load(tensor_table + 5 * tensor + 3)
        has_grad = tl.load(tensor_table + 5 * tensor + 4)
        offs = start + tl.arange(0, BLOCK)
        real = offs < numel
        m = tl.load(m_base + m_off + offs, mask=real, other=0.0)
        if has_grad != 0:
            g = tl.load(g_base + g_off + offs, mask=real, other=0.0)
            c = m * beta1 + g * one_minus_beta1
            tl.store(m_base + m_off + offs, tl.fma(g, one_minus_beta2, m * beta2), mask=real)
        else:
            c = m * beta1
        s = tl.where(c > 0, 1, 0) - tl.where(c < 0, 1, 0)  # NaN -> 0
        s = tl.where(real, s, 0)
        tl.store(zeros + pid, tl.sum(tl.where(real & (s == 0), 1, 0), axis=0))
        padded = (numel + 7) // 8 * 8
        if WIDTH == 8:
            tl.store(
                out + bucket_off + offs,
                s.to(tl.int8).to(tl.uint8, bitcast=True),
                mask=offs < padded,
            )
        else:
            codes = tl.reshape((s + 1).to(tl.int32), (BLOCK // 4, 4))
            shifts = tl.arange(0, 4) * 2
            packed = tl.sum(codes << shifts[None, :], axis=1).to(tl.uint8)
            bytes_ = (bucket_off + start) // 4 + tl.arange(0, BLOCK // 4)
            first = start + 4 * tl.arange(0, BLOCK // 4)
            tl.store(out + bytes_, packed, mask=first < padded)

    @triton.jit
    def _apply_kernel(
        p_base, codes, tensor_table, block_table, lr_table, mul, add, ranks,
        BLOCK: tl.constexpr, WIDTH: tl.constexpr, AVERAGE: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        tensor = tl.load(block_table + 2 * pid)
        start = tl.load(block_table + 2 * pid + 1)
        numel = tl.load(tensor_table + 3 * tensor)
        p_off = tl.load(tensor_table + 3 * tensor + 1)
        bucket_off = tl.load(tensor_table + 3 * tensor + 2)
        decay = tl.load(lr_table + 3 * tensor)
        neg_lr = tl.load(lr_table + 3 * tensor + 1)
        decays = tl.load(lr_table + 3 * tensor + 2)
        offs = start + tl.arange(0, BLOCK)
        mask = offs < numel
        e = bucket_off + offs
        if WIDTH == 8:
            v = tl.load(codes + e, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.int32)
        else:
            bit = e * WIDTH
            byte = tl.load(codes + bit // 8, mask=mask, other=0).to(tl.int32)
            v = ((byte >> (bit % 8)) & ((1 << WIDTH) - 1)) * mul + add
        if AVERAGE:
            u = tl.math.div_rn(v.to(tl.float32), ranks)  # IEEE division (not div.full) on GPUs
        else:
            u = (tl.where(v > 0, 1, 0) - tl.where(v < 0, 1, 0)).to(tl.float32)
        p = tl.load(p_base + p_off + offs, mask=mask)
        p = tl.where(decays != 0, p * decay, p)
        tl.store(p_base + p_off + offs, tl.fma(u, neg_lr, p), mask=mask)
