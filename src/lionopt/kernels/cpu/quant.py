"""The fused CPU kernel for 8-bit momentum and for stochastically rounded bf16 weights.

``csrc/lion_quant_cpu.cpp``, a plain C ABI library loaded with ctypes, is built on first use
(never at import) by ``kernels._build`` and cached; a failed build warns once and
``available()`` returns False, so callers use the torch paths. One call covers a group: the
work (256-element blocks for 8-bit momentum, 4096-element chunks otherwise), cut into units of
16K elements across all tensors, is taken dynamically by ``torch.get_num_threads()`` OpenMP
threads; each block is dequantised, stepped in fp32 and requantised through a 1 KiB stack
buffer (AVX2 intrinsics where the build has them), so no parameter-sized temporary is
allocated. The Python side builds the pointer tables as ``array.array`` buffers with
whole-list ``map`` calls (tens of microseconds for a hundred tensors).

Bitwise equal to the torch paths (``reference.quantized_lion_loop`` and the reference loop
with ``rounding_keys``). ``supports_*`` declines (falling back to foreach): non-CPU or
non-contiguous tensors, other dtypes, and cautious Lion (a per-tensor mean, a second pass).

``kernels.cpu`` registers it twice: ``cpu-int8`` (``supports_quantized`` /
``quantized_lion_step``) and ``cpu-rounding`` (``supports`` / ``lion_step``: plain momentum, bf16
weights rounded stochastically). The C++ group dispatch calls the same 8-bit entry point.
"""

from __future__ import annotations

import array
import ctypes
from operator import attrgetter
from pathlib import Path

import torch
from torch import Tensor

from lionopt.kernels.cpu._build import LazyLibrary
from lionopt.kernels.hyper import LionHyper
from lionopt.kernels.rounding import MASK32

__all__ = [
    "available",
    "build_info",
    "lion_step",
    "quantized_lion_step",
    "supports",
    "supports_quantized",
]

_SOURCE = Path(__file__).with_name("csrc") / "lion_quant_cpu.cpp"
_ABI_VERSION = 2
# Storage dtype codes and option bits, as numbered in lion_quant_cpu.cpp.
_DTYPES = {torch.float32: 0, torch.bfloat16: 2}
_DECAY, _CAUTIOUS_DECAY, _MAXIMIZE, _ROUND = 1, 4, 8, 16
# (weights, momentum) of the plain-momentum kernel.
_PLAIN = {
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.bfloat16),
}

_IS_CPU, _LAYOUT = attrgetter("is_cpu"), attrgetter("layout")
_U32 = next(code for code in "IL" if array.array(code).itemsize == 4)  # uint32_t keys


def available() -> bool:
    """Whether the kernel runs here; builds (or loads the cached build) on the first call."""
    return _library.available()


def build_info() -> dict:
    """Where the library is, the compiler and flags, and whether this process compiled it."""
    available()
    return dict(_library.info)


def supports(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], hyper: LionHyper
) -> bool:
    """bf16 weights with bf16 or fp32 momentum, or fp32 weights with bf16 momentum (grads in
    the weights' dtype), contiguous CPU tensors, not cautious."""
    if not params:
        return True
    if (params[0].dtype, exp_avgs[0].dtype) not in _PLAIN:
        return False
    return _plain_layout(params, grads, exp_avgs, hyper)


def supports_quantized(
    params: list[Tensor],
    grads: list[Tensor],
    codes: list[Tensor],
    scales: list[Tensor],
    hyper: LionHyper,
) -> bool:
    """fp32 or bf16 weights (grads alike) with 8-bit momentum, contiguous CPU tensors."""
    if not params or params[0].dtype not in _DTYPES:
        return False
    return _plain_layout(params, grads, codes, hyper) and all(
        s.dtype == torch.float32 and s.is_cpu and s.is_contiguous() for s in scales
    )


def lion_step(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], hyper: LionHyper
) -> None:
    """One in-place step with a plain momentum (bf16 weights rounded stochastically when
    ``hyper`` has keys)."""
    if not params:
        return
    _buffers, head = _arrays(params, grads, exp_avgs, None, hyper)  # held during the call
    status = _library.lib.lionopt_lion_plain_step(
        *head,
        _DTYPES[params[0].dtype],
        _DTYPES[exp_avgs[0].dtype],
        _flags(hyper),
        torch.get_num_threads(),
    )
    if status != 0:
        raise TypeError(f"lionopt: no kernel for {params[0].dtype} with {exp_avgs[0].dtype}")
    torch.autograd.graph.increment_version([*params, *exp_avgs])  # as in-place ops do


def quantized_lion_step(
    params: list[Tensor],
    grads: list[Tensor],
    codes: list[Tensor],
    scales: list[Tensor],
    hyper: LionHyper,
) -> None:
    """One in-place step over weights with 8-bit momentum (codes and scales updated)."""
    if not params:
        return
    _buffers, head = _arrays(params, grads, codes, scales, hyper)  # held during the call
    status = _library.lib.lionopt_lion_quant_step(
        *head,
        _DTYPES[params[0].dtype],
        _flags(hyper),
        torch.get_num_threads(),
    )
    if status != 0:
        raise TypeError(f"lionopt: no 8-bit kernel for parameter dtype {params[0].dtype}")
    torch.autograd.graph.increment_version([*params, *codes, *scales])  # as in-place ops do


def _plain_layout(params, grads, moments, hyper: LionHyper) -> bool:
    """Grads of the weights' dtype and sizes, below 2**32 elements; dense contiguous CPU tensors.

    Whole-list checks (``map`` over the tensor methods), as in ``kernels.cpu.plain``: a few
    microseconds for a hundred tensors.
    """
    if hyper.cautious:
        return False
    dtype = params[0].dtype
    if any(g.dtype != dtype for g in grads):
        return False
    numels = list(map(Tensor.numel, params))
    if numels != list(map(Tensor.numel, grads)) or max(numels) >= 2**32:
        return False
    for tensors in (params, grads, moments):
        if not all(map(_IS_CPU, tensors)) or any(
            layout != torch.strided for layout in map(_LAYOUT, tensors)
        ):
            return False
        if not all(map(Tensor.is_contiguous, tensors)):
            return False
    return True


def _flags(hyper: LionHyper) -> int:
    return (
        (_DECAY if hyper.weight_decay != 0 else 0)
        | (_CAUTIOUS_DECAY if hyper.cautious_weight_decay else 0)
        | (_MAXIMIZE if hyper.maximize else 0)
        | (_ROUND if hyper.rounding_keys is not None else 0)
    )


def _arrays(params, grads, moments, scales, hyper: LionHyper) -> tuple:
    """The leading C arguments: count, pointer arrays, numels, lrs, keys and the betas/decay.

    The arrays are ``array.array`` buffers passed by address; the caller holds the returned
    ``buffers`` until the C call returns.
    """
    count = len(params)
    buffers = [array.array("Q", map(Tensor.data_ptr, ts)) for ts in (params, grads, moments)]
    if scales is not None:
        buffers.append(array.array("Q", map(Tensor.data_ptr, scales)))
    buffers.append(array.array("q", map(Tensor.numel, params)))
    buffers.append(array.array("d", hyper.lrs(count)))
    keys = hyper.rounding_keys
    if keys is not None:
        buffers.append(array.array(_U32, [k & MASK32 for k in keys]))
    addresses = [b.buffer_info()[0] for b in buffers]
    if keys is None:
        addresses.append(None)
    return buffers, (
        count,
        *addresses,
        float(hyper.beta1),
        float(hyper.beta2),
        float(hyper.weight_decay),
    )


def _declare(lib: ctypes.CDLL) -> None:
    i64, i32, dbl, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_void_p
    lib.lionopt_quant_abi_version.restype = i32
    lib.lionopt_lion_quant_step.restype = i32
    lib.lionopt_lion_quant_step.argtypes = [i64, *[ptr] * 7, dbl, dbl, dbl, i32, i32, i32]
    lib.lionopt_lion_plain_step.restype = i32
    lib.lionopt_lion_plain_step.argtypes = [i64, *[ptr] * 6, dbl, dbl, dbl, i32, i32, i32, i32]


def _check_abi(lib: ctypes.CDLL, info: dict) -> None:
    if lib.lionopt_quant_abi_version() != _ABI_VERSION:
        raise RuntimeError(f"{info['path']} has another ABI version")


_library = LazyLibrary(
    _SOURCE,
    "lionopt_quant_cpu",
    check=_check_abi,
    declare=_declare,
    description="fused CPU 8-bit/rounding kernel",
)
