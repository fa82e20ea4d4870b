"""Back-compat: ``lionopt.lion`` moved to ``lionopt.optim.lion`` (and ``optim.base``)."""

from lionopt.optim.base import ParamsT, SparseGradientError
from lionopt.optim.lion import Lion

__all__ = ["Lion", "ParamsT", "SparseGradientError"]
