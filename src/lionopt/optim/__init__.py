"""The optimizer classes: ``LionFamily`` (``base``), ``Lion``, ``Signum`` and ``Tiger``."""

from lionopt.optim.base import LionFamily, SparseGradientError
from lionopt.optim.lion import Lion
from lionopt.optim.signum import Signum
from lionopt.optim.tiger import Tiger, tiger_param_groups

__all__ = ["Lion", "LionFamily", "Signum", "SparseGradientError", "Tiger", "tiger_param_groups"]
