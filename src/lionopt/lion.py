"""Back-compat: ``lionopt.lion`` moved to ``lionopt.optim.lion`` (and ``optim.base``)."""

from lionopt.optim.base import ParamsT, SparseGradientError
from lionopt.optim.lion import Lion

__all__ = ["Lion", "ParamsT", "SparseGradientError"]

# Pickles of whole optimizers written before the move name these classes.
from lionopt.kernels.cpu.dispatch import TrackedState as _TrackedState  # noqa: F401
