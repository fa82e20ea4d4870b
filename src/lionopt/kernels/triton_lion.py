"""Back-compat: moved to ``lionopt.kernels.triton.plain`` (importing it imports triton)."""

from lionopt.kernels.triton.plain import available, lion_step, supports

__all__ = ["available", "lion_step", "supports"]
