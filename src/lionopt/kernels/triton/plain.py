"""The fused CUDA Lion kernel in Triton: one launch covers every tensor of a group.

Each program handles ``BLOCK`` elements of one tensor. A block table (tensor index, first
element) and a tensor table (numel and the element offset of θ, g and m from the first tensor
of each list) are built on the host, cached per list of tensors, and read by the kernel, so a
step is one launch however many tensors there are. There is no autotuning: an in-place kernel
must run exactly once per step.

Math (fp32, also for bf16/fp16 storage, rounded once when stored): the reference's roundings
exactly, with the compiler's fp contraction off (``enable_fp_fusion=False``) and ``tl.fma``
where ATen's ``add(..., alpha=)`` fuses; sign(0) = sign(NaN) = 0, so a NaN gradient moves
nothing and makes the momentum NaN. Options: weight decay, maximize, per-tensor lr, cautious
weight decay. ``supports()`` declines (the group falls back to foreach) for cautious Lion,
stochastic rounding (``hyper.rounding_keys``), fp64 and complex tensors, and non-contiguous
tensors.

``triton`` is imported lazily. Under ``TRITON_INTERPRET=1`` the kernel also runs on CPU
tensors, which is how the test suite checks it without a GPU.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict

import torch
from torch import Tensor

from lionopt.kernels.hyper import LionHyper

# This module is imported only when a CUDA group (or the interpreter test) needs it.
try:
    import triton
    import triton.language as tl
except Exception as exc:  # a missing or broken triton must never break lionopt
    triton = tl = None
    _IMPORT_ERROR = exc

__all__ = ["available", "lion_step", "supports"]

BLOCK = 1024
NUM_WARPS = 4
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MOMENTUM_DTYPES = {
    torch.float32: (torch.float32,),
    torch.bfloat16: (torch.bfloat16, torch.float32),
    torch.float16: (torch.float16, torch.float32),
}
_TABLE_CACHE_SIZE = 8

_lock = threading.Lock()
_state: bool | None = None
_tables: OrderedDict = OrderedDict()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """Whether Triton imports and can run here (a CUDA device, or the interpreter)."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _load()
    return _state


def supports(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], hyper: LionHyper
) -> bool:
    if not params:
        return True
    if hyper.cautious or hyper.rounding_keys is not None:
        return False
    p_dtype = params[0].dtype
    if p_dtype not in _DTYPES or grads[0].dtype != p_dtype:
        return False
    if exp_avgs[0].dtype not in _MOMENTUM_DTYPES[p_dtype]:
        return False
    device_types = ("cuda", "cpu") if _interpreting() else ("cuda",)
    for tensors in (params, grads, exp_avgs):
        for t in tensors:
            if t.device.type not in device_types or not t.is_contiguous():
                return False
    return all(p.numel() == g.numel() == m.numel() for p, g, m in zip(params, grads, exp_avgs))


def lion_step(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], hyper: LionHyper
) -> None:
    """One in-place Lion step over a group that ``supports()`` accepted: one kernel launch."""
    if not params or not available():
        if params:
            raise RuntimeError("lionopt: the Triton Lion kernel is not available")
        return
    tables = _tables_for(params, grads, exp_avgs)
    if tables is None:  # every tensor is empty
        return
    tensor_table, block_table, n_blocks, vecs = tables
    count = len(params)
    uniform_lr = hyper.uniform_lr
    if uniform_lr is None:
        lrs = hyper.lrs(count)
        lr_table = torch.tensor(
            [[1 - lr * hyper.weight_decay, -lr] for lr in lrs],
            dtype=torch.float32,
            device=params[0].device,
        )
        uniform_lr = 0.0
    else:
        lr_table = tensor_table  # unused by the kernel
    _lion_kernel[(n_blocks,)](
        params[0],
        grads[0],
        exp_avgs[0],
        tensor_table,
        block_table,
        lr_table,
        1 - uniform_lr * hyper.weight_decay,
        -uniform_lr,
        hyper.beta1,
        1 - hyper.beta1,
        hyper.beta2,
        1 - hyper.beta2,
        -1.0 if hyper.maximize else 1.0,
        BLOCK=BLOCK,
        PER_TENSOR_LR=hyper.uniform_lr is None,
        DECAY=hyper.weight_decay != 0,
        CAUTIOUS_DECAY=hyper.cautious_weight_decay,
        P_VEC=vecs[0],
        G_VEC=vecs[1],
        M_VEC=vecs[2],
        P_BF16=params[0].dtype == torch.bfloat16,
        M_BF16=exp_avgs[0].dtype == torch.bfloat16,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
    torch.autograd.graph.increment_version([*params, *exp_avgs])  # as in-place ops do


def _tables_for(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor]):
    """Device tables for these tensors, cached by their addresses and sizes."""
    lists = (params, grads, exp_avgs)
    addresses = [[t.data_ptr() for t in tensors] for tensors in lists]
    numels = [p.numel() for p in params]
    key = (params[0].device, *(tuple(a) for a in addresses), tuple(numels))
    cached = _tables.get(key)
    if cached is not None:
        _tables.move_to_end(key)
        return cached

    sizes = [tensors[0].element_size() for tensors in lists]
    offsets = []
    for address_list, size in zip(addresses, sizes):
        base = address_list[0]
        offsets.append([(a - base) // size for a in address_list])
    rows = [[n, offsets[0][i], offsets[1][i], offsets[2][i]] for i, n in enumerate(numels)]
    blocks = [[i, start] for i, n in enumerate(numels) for start in range(0, n, BLOCK)]
    if not blocks:
        return None
    # Tell the compiler the offsets keep 16-byte alignment when every address has it.
    vecs = tuple(
        16 // size if all(a % 16 == 0 for a in address_list) else 1
        for address_list, size in zip(addresses, sizes)
    )
    device = params[0].device
    tables = (
        torch.tensor(rows, dtype=torch.int64, device=device),
        torch.tensor(blocks, dtype=torch.int64, device=device),
        len(blocks),
        vecs,
    )
    _tables[key] = tables
    if len(_tables) > _TABLE_CACHE_SIZE:
        _tables.popitem(last=False)
    return tables


def _load() -> bool:
    try:
        if triton is None:
            raise RuntimeError(f"triton does not import: {_IMPORT_ERROR}")
        if not (_interpreting() or torch.cuda.is_available()):
            raise RuntimeError("no CUDA device")
        return True
    except Exception as exc:
        warnings.warn(
            f"lionopt: the Triton Lion kernel is not available ({exc}); "
            "using the foreach implementation instead.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False


if triton is not None:

    @triton.jit
    def _to_bf16(x):
        # fp32 -> bf16, round-to-nearest-even, in integer arithmetic (as torch's .copy_ does;
        # the same on GPUs and in the interpreter, whose own cast truncates).
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _lion_kernel(
        p_base,
        g_base,
        m_base,
        tensor_table,
        block_table,
        lr_table,
        decay,
        neg_lr,
        beta1,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        grad_sign,
        BLOCK: tl.constexpr,
        PER_TENSOR_LR: tl.constexpr,
        DECAY: tl.constexpr,
        CAUTIOUS_DECAY: tl.constexpr,
        P_VEC: tl.constexpr,
        G_VEC: tl.constexpr,
        M_VEC: tl.constexpr,
        P_BF16: tl.constexpr,
        M_BF16: tl.constexpr,
    ):
        pid = tl.program_id(0)
        tensor = tl.load(block_table + 2 * pid)
        start = tl.load(block_table + 2 * pid + 1)
        numel = tl.load(tensor_table + 4 * tensor)
        p_off = tl.multiple_of(tl.load(tensor_table + 4 * tensor + 1), P_VEC)
        g_off = tl.multiple_of(tl.load(tensor_table + 4 * tensor + 2), G_VEC)
        m_off = tl.multiple_of(tl.load(tensor_table + 4 * tensor + 3), M_VEC)
        if PER_TENSOR_LR:
            decay = tl.load(lr_table + 2 * tensor)
            neg_lr = tl.load(lr_table + 2 * tensor + 1)

        offs = start + tl.arange(0, BLOCK)
        mask = offs < numel
        p_ptrs = p_base + p_off + offs
        m_ptrs = m_base + m_off + offs
        g = tl.load(g_base + g_off + offs, mask=mask).to(tl.float32) * grad_sign
        m = tl.load(m_ptrs, mask=mask).to(tl.float32)
        p = tl.load(p_ptrs, mask=mask).to(tl.float32)

        c = m * beta1 + g * one_minus_beta1
        direction = tl.where(c > 0, 1.0, 0.0) - tl.where(c < 0, 1.0, 0.0)  # NaN -> 0
        if DECAY:
            if CAUTIOUS_DECAY:  # noqa: SIM108 (a constexpr branch, resolved at compile time)
                p = tl.where(direction * p >= 0, p * decay, p)  # arXiv 2510.12402
            else:
                p = p * decay
        p = tl.fma(direction, neg_lr, p)
        m = tl.fma(g, one_minus_beta2, m * beta2)
        if P_BF16:
            tl.store(p_ptrs, _to_bf16(p), mask=mask)
        else:
            tl.store(p_ptrs, p.to(p_base.dtype.element_ty), mask=mask)
        if M_BF16:
            tl.store(m_ptrs, _to_bf16(m), mask=mask)
        else:
            tl.store(m_ptrs, m.to(m_base.dtype.element_ty), mask=mask)
