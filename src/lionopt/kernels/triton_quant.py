"""Back-compat: moved to ``lionopt.kernels.triton.quant`` (importing it imports triton)."""

from lionopt.kernels.triton.quant import available, lion_step, supports

__all__ = ["available", "lion_step", "supports"]
