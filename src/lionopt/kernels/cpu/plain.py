"""The fused CPU Lion kernel: one multi-threaded pass over θ, g and m for a whole group.

The kernel is ``csrc/lion_cpu.cpp``, a plain C ABI library (no torch headers, so it builds in
seconds rather than the minute a torch extension takes). ``lionopt.kernels.cpu._build`` compiles it
on first use, never at import, with the C++ compiler in ``$CXX`` (default ``c++``) and
``-O3 -ffp-contract=off -fno-trapping-math -fopenmp`` (plus ``-mavx2 -mfma`` where the CPU has
them), into ``$LIONOPT_CACHE_DIR`` or else ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``), under a name that hashes the source, the flags and the compiler;
later processes load that file in milliseconds. Where the build fails (no compiler, no OpenMP, a read-only cache),
``available()`` warns once and returns False, and ``lionopt`` uses the foreach path.

One call covers every tensor of a group: the concatenation of the tensors is cut into one
contiguous range per thread (``torch.get_num_threads()`` threads, OpenMP), and each element is
read once and written once: 20 bytes per fp32 parameter, no temporaries.

Exactness: bitwise equal to ``lionopt.kernels.reference`` in fp32 and fp64 (every option:
weight decay, maximize, per-tensor lr, cautious, cautious weight decay), and for bf16/fp16
parameters (fp32 math, one round-to-nearest-even store) with bf16/fp16 or fp32 momentum, and for
fp32 parameters with a bf16 or fp16 momentum. The
source writes out the reference's roundings: two rounded products and a rounded add for c, a
rounded decay product, and a fused multiply-add wherever ATen's ``add(..., alpha=)`` fuses
(θ + (−lr)·update and β2·m + (1−β2)·g). NaN payloads are not compared (a NaN stays a NaN).
``supports()`` declines other dtype combinations and stochastically rounded bf16 parameters
(``hyper.rounding_keys``, another kernel's job), so the group falls back to foreach;
``lion_step`` itself sends single tensors it cannot take to foreach: non-contiguous ones,
conjugate views, and under cautious Lion fp32 tensors of more than 2**24 elements (there the
reference's fp32 sum of the mask is no longer an exact count).
"""

from __future__ import annotations

import array
import ctypes
from collections.abc import Callable
from dataclasses import replace
from operator import attrgetter
from pathlib import Path

import torch
from torch import Tensor

from lionopt.kernels.cpu._build import LazyLibrary
from lionopt.kernels.foreach import multi_tensor_lion
from lionopt.kernels.hyper import LionHyper

__all__ = [
    "SOURCE",
    "available",
    "build_info",
    "dtype_code",
    "lion_step",
    "loaded",
    "option_flags",
    "stream_step",
    "streamer",
    "supports",
]

SOURCE = Path(__file__).with_name("csrc") / "lion_cpu.cpp"
_ABI_VERSION = 1

# Storage dtype codes and option bits, as numbered in lion_cpu.cpp.
_F32, _F64, _BF16, _F16 = 0, 1, 2, 3
_DECAY, _CAUTIOUS, _CAUTIOUS_DECAY, _MAXIMIZE = 1, 2, 4, 8
_DTYPE_CODES = {
    torch.float32: _F32,
    torch.float64: _F64,
    torch.bfloat16: _BF16,
    torch.float16: _F16,
    torch.complex64: _F32,
    torch.complex128: _F64,
}
# (param, grad, momentum) storage combinations the kernel is instantiated for.
_SUPPORTED = {
    (_F32, _F32, _F32),
    (_F64, _F64, _F64),
    (_BF16, _BF16, _BF16),
    (_BF16, _BF16, _F32),
    (_F16, _F16, _F16),
    (_F16, _F16, _F32),
    (_F32, _F32, _BF16),
    (_F32, _F32, _F16),
}
# Above this many elements the reference's fp32 sum of the cautious mask stops being exact.
_MAX_EXACT_FP32_COUNT = 2**24


def available() -> bool:
    """Whether the kernel runs here; builds (or loads the cached build) on the first call."""
    return _library.available()


def loaded() -> bool:
    """Whether the kernel is already loaded (never starts a build; ``torch.compile`` can trace it)."""
    return _library.state is True


def build_info() -> dict:
    """How the library was obtained: path, flags, ``compiled`` (vs cached) and ``seconds``."""
    available()
    return dict(_library.info)


def supports(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], hyper: LionHyper
) -> bool:
    """Whether ``lion_step`` takes this group: dtypes, device and options (a constant-time check).

    Per-tensor properties (contiguity, sizes, conjugate views, the cautious size limit) are
    checked by ``lion_step`` while it collects the data pointers; it hands any tensor the kernel
    cannot take to the foreach implementation, so a step makes one pass over the tensors.
    """
    if not params:
        return True
    if not len(params) == len(grads) == len(exp_avgs):
        return False
    if hyper.rounding_keys is not None and params[0].dtype == torch.bfloat16:
        return False  # stochastic rounding: lionopt.kernels.cpu.quant
    return _dtype_codes(params[0], grads[0], exp_avgs[0]) in _SUPPORTED and params[0].is_cpu


def lion_step(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], hyper: LionHyper
) -> None:
    """One in-place Lion step over a group that ``supports()`` accepted: one kernel call.

    Tensors the kernel cannot take (non-contiguous, mismatched sizes, conjugate views, fp32
    tensors over 2**24 elements with cautious Lion) are updated by the foreach implementation.
    """
    if not params:
        return
    if not available():
        raise RuntimeError("lionopt: the fused CPU kernel is not available")
    codes = _dtype_codes(params[0], grads[0], exp_avgs[0])
    if codes not in _SUPPORTED:
        raise TypeError(f"lionopt: the fused CPU kernel has no variant for dtypes {codes}")
    rejected, numels = _check(params, grads, exp_avgs, hyper, codes[0])
    if rejected:
        kept = [i for i in range(len(params)) if i not in rejected]
        _run_subset(kept, params, grads, exp_avgs, hyper, _kernel_step)
        _run_subset(sorted(rejected), params, grads, exp_avgs, hyper, multi_tensor_lion)
        return
    _kernel_step(params, grads, exp_avgs, hyper, numels)


def _kernel_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hyper: LionHyper,
    numels: list[int] | None = None,
) -> None:
    if not params:
        return
    count = len(params)
    codes = _dtype_codes(params[0], grads[0], exp_avgs[0])
    pointers, numels = _pointers(params, grads, exp_avgs, numels)
    lrs = array.array("d", hyper.lrs(count))
    status = _library.lib.lionopt_lion_step(
        count,
        *_thirds(pointers, count),
        numels.buffer_info()[0],
        lrs.buffer_info()[0],
        float(hyper.beta1),
        float(hyper.beta2),
        float(hyper.weight_decay),
        *codes,
        option_flags(hyper),
        torch.get_num_threads(),
    )
    if status != 0:
        raise TypeError(f"lionopt: the fused CPU kernel has no variant for dtypes {codes}")
    # Written through raw pointers: bump the versions as torch's in-place ops would.
    torch.autograd.graph.increment_version([*params, *exp_avgs])


def option_flags(hyper: LionHyper) -> int:
    """The kernel's option bits (as numbered in lion_cpu.cpp) for these hyperparameters."""
    return (
        (_DECAY if hyper.weight_decay != 0 else 0)
        | (_CAUTIOUS if hyper.cautious else 0)
        | (_CAUTIOUS_DECAY if hyper.cautious_weight_decay else 0)
        | (_MAXIMIZE if hyper.maximize else 0)
    )


def _check(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hyper: LionHyper,
    param_code: int,
) -> tuple[set[int], list[int]]:
    """Indices of the tensors the kernel cannot take, and the params' numels.

    Each check is one map() over a list (~0.1 µs a tensor); indices are found only on failure.
    Params share a device (the caller groups them); grads and momenta are checked, because a
    pointer from another device would crash the kernel.
    """
    rejected: set[int] = set()
    for tensors in (grads, exp_avgs):
        if not all(map(_on_cpu, tensors)):
            rejected.update(i for i, t in enumerate(tensors) if not t.is_cpu)
    for tensors in (params, grads, exp_avgs):
        if not _all_contiguous(tensors):
            rejected.update(i for i, t in enumerate(tensors) if not _is_dense_contiguous(t))
    numels = list(map(Tensor.numel, params))
    for tensors in (grads, exp_avgs):
        sizes = list(map(Tensor.numel, tensors))
        if sizes != numels:
            rejected.update(i for i, (a, b) in enumerate(zip(numels, sizes)) if a != b)
    complex_params = params[0].is_complex()
    if complex_params:
        for tensors in (params, grads, exp_avgs):
            rejected.update(i for i, t in enumerate(tensors) if t.is_conj() or t.is_neg())
    if hyper.cautious and param_code != _F64:
        # Above 2**24 elements the reference's fp32 sum of the mask is no longer exact.
        limit = _MAX_EXACT_FP32_COUNT // (2 if complex_params else 1)
        rejected.update(i for i, n in enumerate(numels) if n > limit)
    return rejected, numels


_on_cpu = attrgetter("is_cpu")


def _all_contiguous(tensors: list[Tensor]) -> bool:
    try:
        return all(map(Tensor.is_contiguous, tensors))
    except RuntimeError:  # sparse tensors have no is_contiguous
        return False


def _is_dense_contiguous(t: Tensor) -> bool:
    try:
        return t.is_contiguous()
    except RuntimeError:
        return False


def _run_subset(indices, params, grads, exp_avgs, hyper: LionHyper, step) -> None:
    if not indices:
        return
    lrs = hyper.lrs(len(params))
    keys = hyper.rounding_keys
    sub_hyper = replace(
        hyper,
        lr=[lrs[i] for i in indices],
        rounding_keys=None if keys is None else [keys[i] for i in indices],
    )
    step(*([tensors[i] for i in indices] for tensors in (params, grads, exp_avgs)), sub_hyper)


def stream_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor]) -> None:
    """The memory roofline of a Lion step: read p, g, m and write p, m, with no math.

    Same tensors, same split across threads, same bytes as ``lion_step``; it changes the
    values (p += g, m -= g), so run it on scratch tensors.
    """
    streamer(params, grads, exp_avgs)()


def streamer(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor]
) -> Callable[[], None]:
    """``stream_step`` with its pointer table built once: each call is one kernel call.

    The benchmark's roofline, so that it measures memory traffic and no Python work. The
    returned function holds the tensors, so their memory stays valid while it is used.
    """
    if not params:
        return lambda: None
    if not available():
        raise RuntimeError("lionopt: the fused CPU kernel is not available")
    count = len(params)
    pointers, numels = _pointers(params, grads, exp_avgs)
    element_size = params[0].element_size()
    args = (count, *_thirds(pointers, count), numels.buffer_info()[0], element_size)
    stream = _library.lib.lionopt_stream

    def run() -> None:
        if stream(*args, torch.get_num_threads()) != 0:
            raise TypeError(f"lionopt: no stream kernel for element size {element_size}")

    run.keepalive = (pointers, numels, params, grads, exp_avgs)  # what the arguments point into
    return run


def _thirds(pointers: array.array, count: int) -> tuple[int, int, int]:
    base = pointers.buffer_info()[0]
    step = count * pointers.itemsize
    return base, base + step, base + 2 * step


def dtype_code(dtype: torch.dtype) -> int:
    """The kernel's code for a storage dtype (as numbered in lion_cpu.cpp); -1 if it has none."""
    return _DTYPE_CODES.get(dtype, -1)


def _dtype_codes(param: Tensor, grad: Tensor, exp_avg: Tensor) -> tuple[int, int, int]:
    return tuple(_DTYPE_CODES.get(t.dtype, -1) for t in (param, grad, exp_avg))


def _pointers(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    numels: list[int] | None = None,
) -> tuple[array.array, array.array]:
    """3·n data pointers (params, then grads, then momenta) and the n element counts."""
    addresses = list(map(Tensor.data_ptr, params))  # array(list) is faster than array(map)
    addresses.extend(map(Tensor.data_ptr, grads))
    addresses.extend(map(Tensor.data_ptr, exp_avgs))
    if numels is None:
        numels = list(map(Tensor.numel, params))
    if params[0].is_complex():  # two reals per element
        numels = [2 * n for n in numels]
    return array.array("Q", addresses), array.array("q", numels)


# ---------------------------------------------------------------------------------------------
# Loading the library (built by lionopt.kernels.cpu._build on first use, then cached on disk).


def _check_abi(lib: ctypes.CDLL, info: dict) -> None:
    if lib.lionopt_abi_version() != _ABI_VERSION:
        raise RuntimeError(f"{info['path']} has ABI version {lib.lionopt_abi_version()}")


def _declare(lib: ctypes.CDLL) -> None:
    i64, i32, dbl, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_void_p
    lib.lionopt_lion_step.restype = i32
    lib.lionopt_lion_step.argtypes = [
        *(i64, ptr, ptr, ptr, ptr, ptr),
        *(dbl, dbl, dbl),
        *(i32, i32, i32, i32, i32),
    ]
    lib.lionopt_stream.restype = i32
    lib.lionopt_stream.argtypes = [i64, ptr, ptr, ptr, ptr, i32, i32]


_library = LazyLibrary(
    SOURCE,
    "lionopt_fused_cpu",
    check=_check_abi,
    declare=_declare,
    description="fused CPU Lion kernel",
)
