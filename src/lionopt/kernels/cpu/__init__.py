"""The CPU backends: C ABI kernels compiled on first use (never at import) and cached.

- ``plain``: the fused Lion kernel for plain momenta (``csrc/lion_cpu.cpp``);
- ``quant``: 8-bit momentum and stochastically rounded bf16 weights (``csrc/lion_quant_cpu.cpp``);
- ``op``: the plain step as the custom op ``lionopt::lion_step_``, which ``torch.compile`` keeps;
- ``dispatch``: the per-tensor bookkeeping of a plain step in C++ (``csrc/lion_cpu_dispatch.cpp``)
  and ``GroupStepCache``, which lets an optimizer step a whole group in one C++ call;
- ``_build``: the compile-and-cache machinery.

Importing this package registers three backends with ``lionopt.kernels.registry``, in this
order: ``cpu`` (plain), ``cpu-rounding`` (plain momentum, bf16 weights rounded stochastically,
and a few dtype pairs the first does not take) and ``cpu-int8`` (8-bit momentum). The step
functions look the kernels up at call time, so tests can replace them.
"""

from __future__ import annotations

from lionopt.kernels.cpu import dispatch, op, plain, quant
from lionopt.kernels.group import TensorGroup
from lionopt.kernels.hyper import LionHyper
from lionopt.kernels.registry import Backend, register
from lionopt.state.formats import INT8_KIND, PLAIN_KIND

__all__ = ["dispatch", "op", "plain", "quant"]


def _plain_supports(group: TensorGroup, hyper: LionHyper) -> bool:
    return plain.supports(group.params, group.grads, group.momenta, hyper)


def _plain_step(group: TensorGroup, hyper: LionHyper) -> None:
    # One C++ call checks every tensor and runs the kernel; it declines (nothing written)
    # while it is building or when a tensor needs the Python checks below.
    if dispatch.lists_step(group.params, group.grads, group.momenta, hyper):
        return
    plain.lion_step(group.params, group.grads, group.momenta, hyper)


def _rounding_supports(group: TensorGroup, hyper: LionHyper) -> bool:
    return quant.supports(group.params, group.grads, group.momenta, hyper)


def _rounding_step(group: TensorGroup, hyper: LionHyper) -> None:
    quant.lion_step(group.params, group.grads, group.momenta, hyper)


def _int8_supports(group: TensorGroup, hyper: LionHyper) -> bool:
    return quant.supports_quantized(group.params, group.grads, group.momenta, group.scales, hyper)


def _int8_step(group: TensorGroup, hyper: LionHyper) -> None:
    quant.quantized_lion_step(group.params, group.grads, group.momenta, group.scales, hyper)


def _plain_available() -> bool:
    return plain.available()


def _quant_available() -> bool:
    return quant.available()


register(
    Backend(
        name="cpu",
        device="cpu",
        formats=frozenset({PLAIN_KIND}),
        rounding=False,
        available=_plain_available,
        supports=_plain_supports,
        step=_plain_step,
        compiled_step=op.compiled_step,
    )
)
register(
    Backend(
        name="cpu-rounding",
        device="cpu",
        formats=frozenset({PLAIN_KIND}),
        rounding=True,
        available=_quant_available,
        supports=_rounding_supports,
        step=_rounding_step,
        secondary=True,
    )
)
register(
    Backend(
        name="cpu-int8",
        device="cpu",
        formats=frozenset({INT8_KIND}),
        rounding=True,
        available=_quant_available,
        supports=_int8_supports,
        step=_int8_step,
    )
)
