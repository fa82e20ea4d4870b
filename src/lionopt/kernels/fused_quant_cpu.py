"""Back-compat: moved to ``lionopt.kernels.cpu.quant``."""

from lionopt.kernels.cpu.quant import (
    available,
    build_info,
    lion_step,
    quantized_lion_step,
    supports,
    supports_quantized,
)

__all__ = [
    "available",
    "build_info",
    "lion_step",
    "quantized_lion_step",
    "supports",
    "supports_quantized",
]
