"""Back-compat: moved to ``lionopt.optim.tiger``."""

from lionopt.optim.tiger import Tiger, tiger_param_groups

__all__ = ["Tiger", "tiger_param_groups"]
