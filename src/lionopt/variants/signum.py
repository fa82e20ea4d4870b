"""Back-compat: moved to ``lionopt.optim.signum``."""

from lionopt.optim.signum import Signum

__all__ = ["Signum"]
