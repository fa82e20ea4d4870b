"""The CUDA backends, in Triton: ``plain`` (plain momenta) and ``quant`` (8-bit momentum and
stochastically rounded bf16 weights).

``triton`` itself is imported only when a CUDA group first asks for a backend (the modules are
loaded lazily here), so importing lionopt never imports triton. Importing this package
registers ``cuda``, ``cuda-rounding`` and ``cuda-int8`` with ``lionopt.kernels.registry``.
Under ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors, which is how the tests check
them without a GPU (they call the modules directly).
"""

from __future__ import annotations

import importlib
from functools import cache

from lionopt.kernels.group import TensorGroup
from lionopt.kernels.hyper import LionHyper
from lionopt.kernels.registry import Backend, register
from lionopt.state.formats import INT8_KIND, PLAIN_KIND


@cache
def _module(name: str):
    """``lionopt.kernels.triton.<name>``, or None where it cannot be imported."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError:
        return None


def _available(name: str):
    def available() -> bool:
        module = _module(name)
        return module is not None and module.available()

    return available


def _plain_supports(group: TensorGroup, hyper: LionHyper) -> bool:
    return _module("plain").supports(group.params, group.grads, group.momenta, hyper)


def _plain_step(group: TensorGroup, hyper: LionHyper) -> None:
    _module("plain").lion_step(group.params, group.grads, group.momenta, hyper)


def _quant_supports(group: TensorGroup, hyper: LionHyper) -> bool:
    module = _module("quant")
    return module.supports(group.params, group.grads, group.momenta, hyper, scales=group.scales)


def _quant_step(group: TensorGroup, hyper: LionHyper) -> None:
    module = _module("quant")
    module.lion_step(group.params, group.grads, group.momenta, hyper, scales=group.scales)


register(
    Backend(
        name="cuda",
        device="cuda",
        formats=frozenset({PLAIN_KIND}),
        rounding=False,
        available=_available("plain"),
        supports=_plain_supports,
        step=_plain_step,
    )
)
register(
    Backend(
        name="cuda-rounding",
        device="cuda",
        formats=frozenset({PLAIN_KIND}),
        rounding=True,
        available=_available("quant"),
        supports=_quant_supports,
        step=_quant_step,
        secondary=True,
    )
)
register(
    Backend(
        name="cuda-int8",
        device="cuda",
        formats=frozenset({INT8_KIND}),
        rounding=True,
        available=_available("quant"),
        supports=_quant_supports,
        step=_quant_step,
    )
)
