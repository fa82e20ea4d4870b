"""Triton (CUDA) Lion kernels for 8-bit blockwise momentum and stochastically rounded bf16 weights.

The CUDA counterpart of ``kernels.cpu.quant``: one launch per group, bitwise equal to the torch
definitions (``reference.quantized_lion_loop`` and the reference loop with ``rounding_keys``).

- 8-bit momentum (``scales`` given): one program per 256-element block of the padded codes. It
  dequantises the block, runs the Lion step in fp32 on the coordinates below the parameter's
  numel (padding keeps its value, as in the reference), takes the block's absmax with
  ``tl.max`` and requantises with the reference's float ops in the same order
  (``state.int8.quantize_into``), using the IEEE ``div_rn``/``sqrt_rn`` (plain ``/`` and
  ``sqrt`` are approximate on GPUs).
- plain momentum (``scales`` None): ``BLOCK`` elements per program, fp32 or bf16 weights and
  momentum; bf16 weights are rounded stochastically when ``hyper.rounding_keys`` is set.

Stochastic rounding uses ``rounding.py``'s counter-based hash in uint32 arithmetic:
``bits(i) = mix32(mix32(i) ^ key)``, 16 low bits added to the magnitude, then truncated.
The step itself is ``triton.plain``'s (no fp contraction, ``tl.fma`` where ATen fuses).
``supports()`` declines (the caller falls back) for cautious Lion, other dtypes, non-contiguous
tensors, mismatched sizes and tensors of 2**32 elements or more.

The contract is ``triton.plain``'s, with an optional ``scales`` list: ``available()``,
``supports(params, grads, exp_avgs, hyper, scales=None)``,
``lion_step(params, grads, exp_avgs, hyper, scales=None)``. Under ``TRITON_INTERPRET=1`` CPU
tensors run too, which is how the tests check it without a GPU.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from lionopt.kernels.hyper import LionHyper
from lionopt.kernels.rounding import _MULTIPLIER, MASK32
from lionopt.kernels.triton.plain import NUM_WARPS, _interpreting, available, tl, triton
from lionopt.state.int8 import BLOCK as QBLOCK
from lionopt.state.int8 import CODE_MAX, NAN_CODE, padded_numel

if triton is not None:
    from lionopt.kernels.triton.plain import _to_bf16

__all__ = ["available", "lion_step", "supports"]

BLOCK = 1024  # elements per program for a plain momentum
_DTYPES = (torch.float32, torch.bfloat16)
_TABLE_CACHE_SIZE = 8
_tables: OrderedDict = OrderedDict()


def supports(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hyper: LionHyper,
    scales: list[Tensor] | None = None,
) -> bool:
    """fp32/bf16 weights (grads alike) with fp32/bf16 momentum, or 8-bit momentum when
    ``scales`` is given; contiguous CUDA tensors (CPU too under the interpreter), not cautious."""
    if not params:
        return True
    if hyper.cautious or params[0].dtype not in _DTYPES:
        return False
    m_dtypes = (torch.int8,) if scales is not None else _DTYPES
    if any(g.dtype != params[0].dtype for g in grads) or exp_avgs[0].dtype not in m_dtypes:
        return False
    lists = [params, grads, exp_avgs] + ([scales] if scales is not None else [])
    device_types = ("cuda", "cpu") if _interpreting() else ("cuda",)
    device = params[0].device
    for tensors in lists:
        for t in tensors:
            if t.device != device or t.device.type not in device_types or not t.is_contiguous():
                return False
    if any(m.dtype != exp_avgs[0].dtype for m in exp_avgs):
        return False
    for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs)):
        n = p.numel()
        if n >= 2**32 or g.numel() != n:
            return False
        if scales is None:
            if m.numel() != n:
                return False
        elif m.numel() != padded_numel(n) or scales[i].numel() * QBLOCK != m.numel():
            return False
    return scales is None or all(s.dtype == torch.float32 for s in scales)


def lion_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hyper: LionHyper,
    scales: list[Tensor] | None = None,
) -> None:
    """One in-place Lion step over a group that ``supports()`` accepted: one kernel launch."""
    if not params:
        return
    if not available():
        raise RuntimeError("lionopt: the Triton kernel is not available")
    quant = scales is not None
    tables = _tables_for(params, grads, exp_avgs, scales)
    if tables is None:  # every tensor is empty
        return
    tensor_table, block_table, n_blocks = tables
    count, device = len(params), params[0].device
    uniform_lr = hyper.uniform_lr
    if uniform_lr is None:
        lr_table = torch.tensor(
            [[1 - lr * hyper.weight_decay, -lr] for lr in hyper.lrs(count)],
            dtype=torch.float32,
            device=device,
        )
        uniform_lr = 0.0
    else:
        lr_table = tensor_table  # unused by the kernel
    rounds = hyper.rounding_keys is not None and params[0].dtype == torch.bfloat16
    if rounds:
        keys = [k & MASK32 for k in hyper.keys(count)]
        key_table = torch.tensor(keys, dtype=torch.int64, device=device)
    else:
        key_table = tensor_table  # unused by the kernel
    _quant_kernel[(n_blocks,)](
        params[0],
        grads[0],
        exp_avgs[0],
        scales[0] if quant else exp_avgs[0],
        tensor_table,
        block_table,
        lr_table,
        key_table,
        1 - uniform_lr * hyper.weight_decay,
        -uniform_lr,
        hyper.beta1,
        1 - hyper.beta1,
        hyper.beta2,
        1 - hyper.beta2,
        -1.0 if hyper.maximize else 1.0,
        BLOCK=QBLOCK if quant else BLOCK,
        QUANT=quant,
        PER_TENSOR_LR=hyper.uniform_lr is None,
        DECAY=hyper.weight_decay != 0,
        CAUTIOUS_DECAY=hyper.cautious_weight_decay,
        ROUND=rounds,
        P_BF16=params[0].dtype == torch.bfloat16,
        M_BF16=exp_avgs[0].dtype == torch.bfloat16,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
    torch.autograd.graph.increment_version([*params, *exp_avgs, *(scales or [])])


def _tables_for(params, grads, moments, scales):
    """Device tables (cached by addresses and sizes): per tensor (numel and the element offsets
    of θ, g, m and the scales from each list's first tensor), per program (tensor, start)."""
    lists = [params, grads, moments] + ([scales] if scales is not None else [])
    addresses = [[t.data_ptr() for t in tensors] for tensors in lists]
    numels = [p.numel() for p in params]
    key = (params[0].device, scales is not None, *map(tuple, addresses), tuple(numels))
    cached = _tables.get(key)
    if cached is not None:
        _tables.move_to_end(key)
        return cached
    offsets = []
    for address_list, tensors in zip(addresses, lists):
        size = tensors[0].element_size()
        offsets.append([(a - address_list[0]) // size for a in address_list])
    offsets += [[0] * len(params)] * (4 - len(offsets))
    rows = [[n, *(column[i] for column in offsets)] for i, n in enumerate(numels)]
    if scales is None:
        spans, block = numels, BLOCK
    else:
        spans, block = [m.numel() for m in moments], QBLOCK  # the padded codes
    blocks = [[i, start] for i, n in enumerate(spans) for start in range(0, n, block)]
    if not blocks:
        return None
    device = params[0].device
    tables = (
        torch.tensor(rows, dtype=torch.int64, device=device),
        torch.tensor(blocks, dtype=torch.int64, device=device),
        len(blocks),
    )
    _tables[key] = tables
    if len(_tables) > _TABLE_CACHE_SIZE:
        _tables.popitem(last=False)
    return tables


if triton is not None:
    # Constants the kernels read (jit code sees module globals only as constexprs).
    _LEVELS = tl.constexpr(float(CODE_MAX * CODE_MAX))
    _CODE_MAX = tl.constexpr(float(CODE_MAX))
    _NAN_CODE = tl.constexpr(NAN_CODE)
    _MULT = tl.constexpr(_MULTIPLIER)
    _NAN = tl.constexpr(float("nan"))
    _INF = tl.constexpr(float("inf"))

    @triton.jit
    def _mix32(x):
        # rounding.mix32 on uint32 (products wrap mod 2**32, as the reference's mask does).
        x = x ^ (x >> 16)
        x = x * _MULT
        x = x ^ (x >> 16)
        x = x * _MULT
        return x ^ (x >> 16)

    @triton.jit
    def _stochastic_bf16(x, index, key):
        # rounding.stochastic_round_bf16: add 16 random bits to |x|'s low half, truncate.
        bits = x.to(tl.uint32, bitcast=True)
        noise = _mix32(_mix32(index.to(tl.uint32)) ^ key) & 0xFFFF
        rounded = (((bits & 0x7FFFFFFF) + noise) >> 16) | ((bits >> 16) & 0x8000)
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _quant_kernel(
        p_base,
        g_base,
        m_base,
        s_base,
        tensor_table,
        block_table,
        lr_table,
        key_table,
        decay,
        neg_lr,
        beta1,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        grad_sign,
        BLOCK: tl.constexpr,
        QUANT: tl.constexpr,
        PER_TENSOR_LR: tl.constexpr,
        DECAY: tl.constexpr,
        CAUTIOUS_DECAY: tl.constexpr,
        ROUND: tl.constexpr,
        P_BF16: tl.constexpr,
        M_BF16: tl.constexpr,
    ):
        pid = tl.program_id(0)
        tensor = tl.load(block_table + 2 * pid)
        start = tl.load(block_table + 2 * pid + 1)
        row = tensor_table + 5 * tensor
        numel = tl.load(row)
        p_off = tl.load(row + 1)
        g_off = tl.load(row + 2)
        m_off = tl.load(row + 3)
        if PER_TENSOR_LR:
            decay = tl.load(lr_table + 2 * tensor)
            neg_lr = tl.load(lr_table + 2 * tensor + 1)

        offs = start + tl.arange(0, BLOCK)
        mask = offs < numel
        p_ptrs = p_base + p_off + offs
        m_ptrs = m_base + m_off + offs
        g = tl.load(g_base + g_off + offs, mask=mask, other=0.0).to(tl.float32) * grad_sign
        p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
        if QUANT:
            # state.int8.dequantize: (k·|k|)·(a/16129); code -128 is NaN. Padding included.
            s_ptr = s_base + tl.load(row + 4) + start // BLOCK
            codes = tl.load(m_ptrs)
            k = codes.to(tl.float32)
            m = (k * tl.abs(k)) * tl.div_rn(tl.load(s_ptr), _LEVELS)
            m = tl.where(codes == _NAN_CODE, _NAN, m)
        else:
            m = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32)

        c = m * beta1 + g * one_minus_beta1
        direction = tl.where(c > 0, 1.0, 0.0) - tl.where(c < 0, 1.0, 0.0)  # NaN -> 0
        if DECAY and CAUTIOUS_DECAY:
            p = tl.where(direction * p >= 0, p * decay, p)  # arXiv 2510.12402
        elif DECAY:
            p = p * decay
        p = tl.fma(direction, neg_lr, p)
        m_new = tl.fma(g, one_minus_beta2, m * beta2)

        if ROUND:
            key = tl.load(key_table + tensor).to(tl.uint32)
            tl.store(p_ptrs, _stochastic_bf16(p, offs, key), mask=mask)
        elif P_BF16:
            tl.store(p_ptrs, _to_bf16(p), mask=mask)
        else:
            tl.store(p_ptrs, p, mask=mask)

        if QUANT:
            # state.int8.quantize_into, op for op; the padding keeps its dequantised value.
            m = tl.where(mask, m_new, m)
            finite = tl.abs(m) < _INF
            magnitude = tl.where(finite, tl.abs(m), 0.0)
            absmax = tl.max(magnitude, axis=0)
            factor = tl.div_rn(absmax, _LEVELS)
            y = tl.div_rn(magnitude, tl.where(factor > 0, factor, 1.0))
            s = tl.floor(tl.sqrt_rn(y))
            k = s + tl.where(y >= s * s + s + 0.5, 1.0, 0.0)
            k = tl.where(factor > 0, tl.minimum(k, _CODE_MAX), 0.0)
            k = tl.where((m.to(tl.uint32, bitcast=True) >> 31) != 0, -k, k)  # copysign
            tl.store(m_ptrs, tl.where(finite, k, _NAN_CODE).to(tl.int8))
            tl.store(s_ptr, absmax)
        elif M_BF16:
            tl.store(m_ptrs, _to_bf16(m_new), mask=mask)
        else:
            tl.store(m_ptrs, m_new, mask=mask)
