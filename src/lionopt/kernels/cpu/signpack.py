"""Distributed Lion's fused CPU passes (``csrc/lion_signpack.cpp``), loaded with ctypes.

``sign_pass`` reads each g and m once, writes m and emits the packed signs of a bucket;
``apply_pass`` decodes the vote and updates θ. They have the signatures of (and are bitwise
equal to) the torch passes in ``lionopt.distributed.voting``, for contiguous fp32 and fp64 CPU
tensors; ``supports()`` declines anything else, and the torch passes run. Built on first use by
``lionopt.kernels._build`` (same flags and cache as the fused Lion kernel).
"""

from __future__ import annotations

import array
import ctypes
from pathlib import Path

import torch
from torch import Tensor

from lionopt.kernels.cpu._build import LazyLibrary

__all__ = [
    "SOURCE",
    "apply_pass",
    "available",
    "count_votes",
    "encode_result",
    "repack_2to1",
    "sign_pass",
    "supports",
]

SOURCE = Path(__file__).with_name("csrc") / "lion_signpack.cpp"
_ABI_VERSION = 2
_DTYPES = {torch.float32: 0, torch.float64: 1}


def available() -> bool:
    """Whether the kernels run here; builds (or loads the cached build) on the first call."""
    return _library.available()


def supports(params: list[Tensor], grads: list[Tensor | None], exp_avgs: list[Tensor]) -> bool:
    """Contiguous CPU tensors of one dtype (fp32 or fp64), gradients and momenta alike."""
    if not params:
        return False
    dtype = params[0].dtype
    if dtype not in _DTYPES:
        return False
    for p, g, m in zip(params, grads, exp_avgs):
        for t in (p, m) if g is None else (p, g, m):
            if t.dtype != dtype or not t.is_cpu or not t.is_contiguous() or t.is_sparse:
                return False
        if m.shape != p.shape or (g is not None and g.shape != p.shape):
            return False
    return True


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
    """As ``voting.sign_pass``: one kernel call for the bucket."""
    count = len(params)
    out = torch.empty(numel if width == 8 else numel // 4, dtype=torch.uint8)
    grad_ptrs = (ctypes.c_void_p * count)(*[0 if g is None else g.data_ptr() for g in grads])
    mom_ptrs = (ctypes.c_void_p * count)(*[m.data_ptr() for m in exp_avgs])
    numels = array.array("q", [p.numel() for p in params])
    offs = array.array("q", offsets)
    zeros = _library.lib.dlion_sign_pass(
        _DTYPES[params[0].dtype],
        count,
        grad_ptrs,
        mom_ptrs,
        numels.buffer_info()[0],
        offs.buffer_info()[0],
        float(beta1),
        1.0 - float(beta1),
        float(beta2),
        1.0 - float(beta2),
        width,
        out.data_ptr(),
        numel,
        torch.get_num_threads(),
    )
    if zeros < 0:
        raise TypeError(f"lionopt: no sign-pack kernel for {params[0].dtype}")
    torch.autograd.graph.increment_version(exp_avgs)
    return out, int(zeros) if count_zeros else 0


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
    """As ``voting.apply_pass``: one kernel call for the bucket's active tensors."""
    count = len(params)
    packed = packed.contiguous()
    ptrs = (ctypes.c_void_p * count)(*[p.data_ptr() for p in params])
    numels = array.array("q", [p.numel() for p in params])
    offs = array.array("q", offsets)
    lr_arr = array.array("d", lrs)
    wd_arr = array.array("d", weight_decays)
    status = _library.lib.dlion_apply_pass(
        _DTYPES[params[0].dtype],
        count,
        ptrs,
        numels.buffer_info()[0],
        offs.buffer_info()[0],
        lr_arr.buffer_info()[0],
        wd_arr.buffer_info()[0],
        packed.data_ptr(),
        fmt.width,
        fmt.mul,
        fmt.add,
        int(vote == "average"),
        ranks,
        torch.get_num_threads(),
    )
    if status != 0:
        raise TypeError(f"lionopt: no sign-pack kernel for {params[0].dtype}")
    torch.autograd.graph.increment_version(params)


def repack_2to1(packed: Tensor) -> Tensor:
    """2-bit sign codes as 1-bit codes (s > 0): ``voting.pack(voting.unpack(x, 2) == 2, 1)``."""
    out = torch.empty(packed.numel() // 2, dtype=torch.uint8)
    _library.lib.dlion_repack_2to1(packed.data_ptr(), out.data_ptr(), out.numel(), _threads())
    return out


def count_votes(rows: Tensor, width: int, sign_only: bool) -> Tensor:
    """int8 S = Σ_r s_r (or sign(S)) from ``(ranks, bytes)`` packed sign codes of ``width``."""
    rows = rows.contiguous()
    ranks, row_bytes = rows.shape
    elements = row_bytes * 8 // width
    out = torch.empty(elements, dtype=torch.int8)
    _library.lib.dlion_count_votes(
        rows.data_ptr(), ranks, elements, width, int(sign_only), out.data_ptr(), _threads()
    )
    return out


def encode_result(counts: Tensor, vote: str, fmt) -> Tensor:
    """``voting.encode_result`` for int8 counts and a width below 8."""
    out = torch.empty(counts.numel() * fmt.width // 8, dtype=torch.uint8)
    _library.lib.dlion_encode_result(
        counts.data_ptr(),
        counts.numel(),
        int(vote == "majority"),
        fmt.width,
        fmt.mul,
        fmt.add,
        out.data_ptr(),
        _threads(),
    )
    return out


def _threads() -> int:
    return torch.get_num_threads()


def _check(lib: ctypes.CDLL, info: dict) -> None:
    version = lib.dlion_abi_version()
    if version != _ABI_VERSION:
        raise RuntimeError(f"ABI version {version}, expected {_ABI_VERSION}")


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    lib.dlion_abi_version.restype = i32
    lib.dlion_sign_pass.restype = i64
    lib.dlion_sign_pass.argtypes = [i32, i64, p, p, p, p, f64, f64, f64, f64, i32, p, i64, i32]
    lib.dlion_apply_pass.restype = i32
    lib.dlion_apply_pass.argtypes = [i32, i64, p, p, p, p, p, p, i32, i32, i32, i32, i32, i32]
    lib.dlion_repack_2to1.restype = None
    lib.dlion_repack_2to1.argtypes = [p, p, i64, i32]
    lib.dlion_count_votes.restype = None
    lib.dlion_count_votes.argtypes = [p, i32, i64, i32, i32, p, i32]
    lib.dlion_encode_result.restype = None
    lib.dlion_encode_result.argtypes = [p, i64, i32, i32, i32, i32, p, i32]


_library = LazyLibrary(
    SOURCE,
    "lionopt_signpack",
    check=_check,
    declare=_declare,
    description="Distributed Lion sign-pack CPU kernel",
    fallback="using torch ops instead",
)
