"""The fused CPU step's per-tensor bookkeeping in C++, for groups of many small tensors.

Python spends about 2 µs a tensor getting a step ready (``p.grad``, the state lookup, dtype,
contiguity and size checks, the data pointers), which on 2000 small tensors is more than the
kernel's own memory traffic. ``csrc/lion_cpu_dispatch.cpp`` does that work in a few hundred
ns per parameter (mostly cache misses on the tensors' metadata) and then calls the same kernel as ``lionopt.kernels.fused_cpu`` (compiled from the same source
with the same flags, so the results are bitwise equal).

It is built against torch's and Python's headers, which takes about 25 s, so the build runs in
a background thread the first time a step asks for it: until it is ready (and wherever it
cannot be built, e.g. without Python's headers, with one warning) steps take the Python path.
The build is cached like the kernel's (``lionopt.kernels._build``), per torch and Python
version. ``wait()`` blocks until it is ready (the benchmark and the tests use it).

Both entry points check every tensor before writing anything, and decline (return False /
``DECLINED``) when one is not a plain contiguous CPU tensor of a dtype combination the kernel
takes; the caller then runs its Python path. Like torch's in-place ops they bump the version
counters of the parameters and momenta they write, so autograd still catches a parameter that
changed after it was saved for backward.
"""

from __future__ import annotations

import ctypes
import sys
import sysconfig
from pathlib import Path

import torch
from torch import Tensor

from lionopt.kernels import fused_cpu
from lionopt.kernels._build import BuildOptions, LazyLibrary
from lionopt.kernels._common import LionHyper

__all__ = ["available", "build_info", "group_step", "lists_step", "wait"]

_SOURCE = Path(__file__).with_name("csrc") / "lion_cpu_dispatch.cpp"
_ABI_VERSION = 2

# lionopt_group_step's results, as numbered in lion_cpu_dispatch.cpp.
STEPPED, NOTHING_TO_DO, DECLINED, STALE = 0, 1, 2, 3


def available() -> bool:
    """Whether the C++ bookkeeping is ready; the first call starts its build in the background."""
    return fused_cpu.available() and _library.available()


def wait(timeout: float | None = None) -> bool:
    """Block until the background build is done (or ``timeout`` s pass); then ``available()``."""
    return fused_cpu.available() and _library.wait(timeout)


def build_info() -> dict:
    """How the library was obtained: path, flags, ``compiled`` (vs cached) and ``seconds``."""
    return dict(_library.info)


def group_step(
    params: list[Tensor],
    cached_params: tuple[Tensor, ...],
    states: tuple[dict | None, ...],
    momentum_dtype: torch.dtype | None,
    hyper: LionHyper,
) -> int:
    """One step of an optimizer group whose parameters and state dicts were cached earlier.

    ``momentum_dtype``: the dtype every momentum must have (float32 or bfloat16), or None for
    any (the optimizer's default, which keeps a loaded momentum's dtype). ``hyper.lr`` is one
    float. Returns ``STEPPED``, ``NOTHING_TO_DO`` (no gradients), ``STALE`` (the cache no
    longer fits the group: rebuild it) or ``DECLINED`` (a tensor the kernel does not take).
    Nothing is written unless it returns ``STEPPED``.
    """
    return _library.lib.lionopt_group_step(
        params,
        cached_params,
        states,
        -1 if momentum_dtype is None else fused_cpu.dtype_code(momentum_dtype),
        float(hyper.lr),
        float(hyper.beta1),
        float(hyper.beta2),
        float(hyper.weight_decay),
        fused_cpu.option_flags(hyper),
        torch.get_num_threads(),
    )


def lists_step(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], hyper: LionHyper
) -> bool:
    """One step over parallel lists of tensors; False (nothing written) when declined."""
    if not available() or hyper.rounding_keys is not None:
        return False
    per_tensor = not isinstance(hyper.lr, (int, float))
    status = _library.lib.lionopt_lists_step(
        params,
        grads,
        exp_avgs,
        list(hyper.lr) if per_tensor else None,
        0.0 if per_tensor else float(hyper.lr),
        float(hyper.beta1),
        float(hyper.beta2),
        float(hyper.weight_decay),
        fused_cpu.option_flags(hyper),
        torch.get_num_threads(),
    )
    return status in (STEPPED, NOTHING_TO_DO)


def _build_options() -> BuildOptions:
    from torch.utils import cpp_extension

    python_include = sysconfig.get_paths()["include"]
    if not (Path(python_include) / "Python.h").exists():
        raise RuntimeError(f"Python's headers are not installed (no {python_include}/Python.h)")
    torch_lib = str(Path(torch.__file__).parent / "lib")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [python_include, *cpp_extension.include_paths()]
    return BuildOptions(
        compile_flags=(
            "-std=c++20",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *(f"-I{path}" for path in includes),
        ),
        link_flags=(
            f"-L{torch_lib}",
            "-ltorch_python",
            "-ltorch",
            "-ltorch_cpu",
            "-lc10",
            f"-Wl,-rpath,{torch_lib}",
        ),
        salt=f"torch {torch.__version__} {torch.__file__}; python {sys.version}",
        dll_type=ctypes.PyDLL,
        includes=(fused_cpu.SOURCE,),
    )


def _check_abi(lib: ctypes.CDLL, info: dict) -> None:
    if lib.lionopt_dispatch_abi_version() != _ABI_VERSION:
        raise RuntimeError(f"{info['path']} has ABI version {lib.lionopt_dispatch_abi_version()}")


def _declare(lib: ctypes.CDLL) -> None:
    obj, dbl, i32 = ctypes.py_object, ctypes.c_double, ctypes.c_int
    lib.lionopt_group_step.restype = i32
    lib.lionopt_group_step.argtypes = [obj, obj, obj, i32, dbl, dbl, dbl, dbl, i32, i32]
    lib.lionopt_lists_step.restype = i32
    lib.lionopt_lists_step.argtypes = [obj, obj, obj, obj, dbl, dbl, dbl, dbl, i32, i32]


_library = LazyLibrary(
    _SOURCE,
    "lionopt_cpu_dispatch",
    check=_check_abi,
    declare=_declare,
    description="C++ dispatch of the fused CPU step",
    fallback="steps get ready in Python, slower over many small tensors",
    build=_build_options,
    background=True,
)
