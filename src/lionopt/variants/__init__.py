"""Members of the Lion family: ``Tiger`` (β1 = β2, relative lr, free accumulation) and ``Signum``."""

from lionopt.variants.signum import Signum
from lionopt.variants.tiger import Tiger, tiger_param_groups

__all__ = ["Signum", "Tiger", "tiger_param_groups"]
