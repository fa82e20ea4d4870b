"""Back-compat: the variants moved to ``lionopt.optim`` (``optim.signum``, ``optim.tiger``)."""

from lionopt.optim.signum import Signum
from lionopt.optim.tiger import Tiger, tiger_param_groups

__all__ = ["Signum", "Tiger", "tiger_param_groups"]
