"""lionopt: the Lion optimizer (EvoLved Sign Momentum) for PyTorch.

``lionopt.Lion`` is a drop-in ``torch.optim.Optimizer``; ``lionopt.functional.lion`` is the
functional step it calls. ``Tiger`` and ``Signum`` are the family's variants, ``hparams`` holds
the hyperparameter rules and ``diagnostics`` the on-demand training figures.
"""

from lionopt import diagnostics, functional, hparams
from lionopt.optim import Lion, Signum, SparseGradientError, Tiger, tiger_param_groups

__all__ = [
    "Lion",
    "Signum",
    "SparseGradientError",
    "Tiger",
    "diagnostics",
    "functional",
    "hparams",
    "tiger_param_groups",
]
__version__ = "0.1.0"
