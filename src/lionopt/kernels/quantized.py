"""Back-compat: 8-bit momentum moved to ``lionopt.state`` (format, codec, checkpoint hooks) and
its step bodies to ``lionopt.kernels.reference`` / ``foreach``."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lionopt.kernels import registry
from lionopt.kernels.foreach import quantized_lion_foreach
from lionopt.kernels.group import TensorGroup
from lionopt.kernels.hyper import LionHyper
from lionopt.kernels.reference import quantized_lion_loop
from lionopt.state.checkpoint import convert_loaded_state, remember_loaded_state
from lionopt.state.formats import INT8_KIND, fp32_view, normalize_momentum_dtype, resolve_format
from lionopt.state.int8 import (
    BLOCK,
    CODE_MAX,
    MIN_NUMEL,
    NAN_CODE,
    dequantize,
    padded_numel,
    quantize,
    quantize_into,
)

__all__ = [
    "BLOCK",
    "CODE_MAX",
    "MIN_NUMEL",
    "NAN_CODE",
    "convert_loaded_state",
    "convert_momentum",
    "dequantize",
    "momentum_tensor",
    "normalize_momentum_dtype",
    "padded_numel",
    "quantize",
    "quantize_into",
    "quantized_lion",
    "quantized_lion_foreach",
    "quantized_lion_loop",
    "remember_loaded_state",
]

INT8 = "int8"
momentum_tensor = fp32_view


def convert_momentum(state: dict, param: Tensor, momentum_dtype: Any) -> None:
    """Create or convert ``state``'s momentum to ``momentum_dtype``'s format."""
    resolve_format(momentum_dtype).prepare(state, param)


def quantized_lion(
    params: list[Tensor],
    grads: list[Tensor],
    codes: list[Tensor],
    scales: list[Tensor],
    hyper: LionHyper,
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """One Lion step over tensors of one device and dtype with 8-bit momentum, in place."""
    if not params:
        return
    group = TensorGroup(params, grads, codes, INT8_KIND, scales, list(range(len(params))))
    if fused is not False and foreach is not True:
        backend = registry.select(group, hyper, explicit=bool(fused))
        if backend is not None:
            backend.step(group, hyper)
            return
    if foreach is False:
        quantized_lion_loop(params, grads, codes, scales, hyper)
    else:
        quantized_lion_foreach(params, grads, codes, scales, hyper)
