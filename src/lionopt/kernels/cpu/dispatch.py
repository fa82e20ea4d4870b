"""The fused CPU step's per-tensor bookkeeping in C++, for groups of many small tensors.

Python spends about 2 µs a tensor getting a step ready (``p.grad``, the state lookup, dtype,
contiguity and size checks, the data pointers), which on 2000 small tensors is more than the
kernel's own memory traffic. ``csrc/lion_cpu_dispatch.cpp`` does that work in a few hundred
ns per parameter (mostly cache misses on the tensors' metadata) and then calls the same kernel as ``lionopt.kernels.cpu.plain`` (compiled from the same source
with the same flags, so the results are bitwise equal).

It is built against torch's and Python's headers, which takes about 25 s, so the build runs in
a background thread the first time a step asks for it: until it is ready (and wherever it
cannot be built, e.g. without Python's headers, with one warning) steps take the Python path.
The build is cached like the kernel's (``lionopt.kernels.cpu._build``), per torch and Python
version. ``wait()`` blocks until it is ready (the benchmark and the tests use it).

``GroupStepCache`` is the optimizer-side half: it remembers each parameter group's parameters
and state dicts after a Python step ("layout"), and later steps hand them to one C++ call
(``group_step``) that reads each ``p.grad`` and ``state["exp_avg"]`` itself. A layout is dropped
when the state is changed (``TrackedState`` counts its changes), the group's params change, or
the C++ side finds it stale (a new parameter with a gradient, a momentum in another format). It
takes the step's ``LionHyper`` and the plain momentum dtype, never a group dict.

Both entry points check every tensor before writing anything, and decline (return False /
``DECLINED``) when one is not a plain contiguous CPU tensor of a dtype combination the kernel
takes; the caller then runs its Python path. Like torch's in-place ops they bump the version
counters of the parameters and momenta they write, so autograd still catches a parameter that
changed after it was saved for backward.
"""

from __future__ import annotations

import ctypes
import operator
import sys
import sysconfig
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lionopt.kernels.cpu import plain as fused_cpu
from lionopt.kernels.cpu import quant
from lionopt.kernels.cpu._build import BuildOptions, LazyLibrary
from lionopt.kernels.hyper import LionHyper
from lionopt.state.dtensor import is_dtensor
from lionopt.state.formats import Int8Blockwise, MomentumFormat, Plain

__all__ = [
    "GroupStepCache",
    "TrackedState",
    "available",
    "build_info",
    "group_step",
    "lists_step",
    "wait",
]

_SOURCE = Path(__file__).with_name("csrc") / "lion_cpu_dispatch.cpp"
_ABI_VERSION = 3

# lionopt_group_step's results, as numbered in lion_cpu_dispatch.cpp.
STEPPED, NOTHING_TO_DO, DECLINED, STALE = 0, 1, 2, 3
_INT8_FORMAT = -2  # lionopt_group_step's momentum code for Int8Blockwise
_quant_kernel = None


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
    momentum: MomentumFormat | torch.dtype | None,
    hyper: LionHyper,
) -> int:
    """One step of an optimizer group whose parameters and state dicts were cached earlier.

    ``momentum``: the group's format. A plain one (or a dtype) names the dtype every momentum
    must have (float32 or bfloat16), or None for any (the optimizer's default, which keeps a
    loaded momentum's dtype); ``Int8Blockwise``: 8-bit codes and scales for the parameters it
    quantises (one call of the 8-bit kernel) and fp32 momenta for the rest (one call of the
    plain kernel), the kernels ``kernels.cpu.quant`` and ``plain`` run. ``hyper.lr`` is one
    float. Returns ``STEPPED``, ``NOTHING_TO_DO`` (no gradients), ``STALE`` (the cache no
    longer fits the group: rebuild it) or ``DECLINED`` (a tensor the kernel does not take).
    Nothing is written unless it returns ``STEPPED``.
    """
    min_numel = 0
    if isinstance(momentum, Int8Blockwise):
        if not _quant_kernel_ready():
            return DECLINED
        code, min_numel = _INT8_FORMAT, momentum.min_numel
    else:
        dtype = momentum.plain_dtype() if isinstance(momentum, MomentumFormat) else momentum
        code = -1 if dtype is None else fused_cpu.dtype_code(dtype)
    return _library.lib.lionopt_group_step(
        params,
        cached_params,
        states,
        code,
        min_numel,
        float(hyper.lr),
        float(hyper.beta1),
        float(hyper.beta2),
        float(hyper.weight_decay),
        fused_cpu.option_flags(hyper),
        torch.get_num_threads(),
    )


def _quant_kernel_ready() -> bool:
    """Hand the 8-bit kernel (``kernels.cpu.quant``'s library) to the C++ dispatch, once."""
    global _quant_kernel
    if _quant_kernel is None:
        if not quant.available():
            return False
        function = quant._library.lib.lionopt_lion_quant_step
        _library.lib.lionopt_set_quant_kernel(ctypes.cast(function, ctypes.c_void_p))
        _quant_kernel = function  # keeps the library loaded
    return True


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


class TrackedState(defaultdict):
    """``Optimizer.state`` (a ``defaultdict(dict)``) that counts the changes made to it.

    ``GroupStepCache`` compares the count to tell whether a remembered layout is still valid.
    """

    version = 0

    def __init__(self, items: dict | None = None) -> None:
        super().__init__(dict, items or {})

    def __reduce__(self):
        return (TrackedState, (), None, None, iter(self.items()))

    def _changed(self) -> None:
        self.version += 1

    def __setitem__(self, key, value) -> None:
        self._changed()
        super().__setitem__(key, value)

    def __delitem__(self, key) -> None:
        self._changed()
        super().__delitem__(key)

    def __ior__(self, other):
        self._changed()
        return super().__ior__(other)

    def clear(self) -> None:
        self._changed()
        super().clear()

    def pop(self, *args):
        self._changed()
        return super().pop(*args)

    def popitem(self):
        self._changed()
        return super().popitem()

    def setdefault(self, key, default=None):
        self._changed()
        return super().setdefault(key, default)

    def update(self, *args, **kwargs) -> None:
        self._changed()
        super().update(*args, **kwargs)


@dataclass(eq=False, repr=False)
class _Layout:
    """A group's parameters and their state dicts, as last seen."""

    owner: Any
    params: tuple[Tensor, ...]
    states: tuple[dict | None, ...]
    state: TrackedState
    version: int

    def fits(self, owner: Any, state: TrackedState) -> bool:
        """Same owner and unchanged state (the C++ side checks the params one by one)."""
        return self.owner is owner and self.state is state and self.version == state.version

    def same_params(self, params: Sequence[Tensor]) -> bool:
        return len(params) == len(self.params) and all(map(operator.is_, params, self.params))


def _group_format(fmt: MomentumFormat) -> bool:
    """Whether the C++ group step handles this format."""
    if isinstance(fmt, Int8Blockwise):
        return True
    return isinstance(fmt, Plain) and fmt.dtype in (None, torch.float32, torch.bfloat16)


class GroupStepCache:
    """Whole-group C++ steps for an optimizer (see the module docstring).

    ``owner`` is any object that identifies a group (the optimizer passes the group dict; it is
    compared by identity only). Use: ``if cache.ready(...) and cache.try_step(...)`` the group
    is stepped; otherwise step it in Python, then ``cache.remember(...)`` when ``ready`` was not
    None.
    """

    def __init__(self) -> None:
        self._layouts: dict[int, _Layout] = {}

    def clear(self) -> None:
        self._layouts = {}

    @staticmethod
    def track(state: Any) -> TrackedState:
        """``state`` as a ``TrackedState`` (the cache needs one to see changes)."""
        return state if isinstance(state, TrackedState) else TrackedState(state)

    @staticmethod
    def ready(
        params: Sequence[Tensor],
        state: Any,
        *,
        fmt: MomentumFormat,
        rounding: bool,
        foreach: bool | None,
        fused: bool | None,
    ) -> bool | None:
        """True: step through the C++ dispatch; False: not yet (it is building); None: never.

        ``fmt``: the group's momentum format (plain fp32/bf16/param dtype, or 8-bit);
        ``rounding``: stochastic rounding is on (another kernel's job).
        """
        if (
            fused is False
            or foreach
            or not _group_format(fmt)
            or rounding
            or not isinstance(state, TrackedState)
            or not params
            or not params[0].is_cpu
            or is_dtensor(params[0])  # FSDP2: functional.lion steps the local shards
            or torch.compiler.is_compiling()
        ):
            return None
        return available()

    def try_step(
        self,
        owner: Any,
        params: list[Tensor],
        state: TrackedState,
        fmt: MomentumFormat,
        hyper: LionHyper,
    ) -> bool:
        """Step the group in one C++ call; False when the caller must step it in Python."""
        layout = self._layouts.get(id(owner))
        if layout is None or not layout.fits(owner, state):
            return False
        status = group_step(params, layout.params, layout.states, fmt, hyper)
        if status == STALE:
            del self._layouts[id(owner)]
        # DECLINED (say, a non-contiguous grad this step): the Python path takes this step.
        return status in (STEPPED, NOTHING_TO_DO)

    def remember(self, owner: Any, params: list[Tensor], state: TrackedState) -> None:
        """Note the group's parameters and state dicts after a Python step."""
        layout = self._layouts.get(id(owner))
        if layout is not None and layout.fits(owner, state) and layout.same_params(params):
            return
        self._layouts[id(owner)] = _Layout(
            owner=owner,
            params=tuple(params),
            states=tuple(map(state.get, params)),
            state=state,
            version=state.version,
        )


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
    i64 = ctypes.c_int64
    lib.lionopt_group_step.argtypes = [obj, obj, obj, i32, i64, dbl, dbl, dbl, dbl, i32, i32]
    lib.lionopt_set_quant_kernel.restype = None
    lib.lionopt_set_quant_kernel.argtypes = [ctypes.c_void_p]
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
