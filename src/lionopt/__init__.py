"""lionopt: the Lion optimizer (EvoLved Sign Momentum) for PyTorch.

``lionopt.Lion`` is a drop-in ``torch.optim.Optimizer``; ``lionopt.functional.lion`` is the
functional step it calls.
"""

from lionopt import functional, hparams
from lionopt.lion import Lion, SparseGradientError

__all__ = ["Lion", "SparseGradientError", "functional", "hparams"]
__version__ = "0.1.0"
