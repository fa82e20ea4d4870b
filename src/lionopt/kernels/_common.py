"""Back-compat: moved to ``lionopt.kernels.hyper``."""

from lionopt.kernels.hyper import CAUTIOUS_MEAN_FLOOR, LionHyper, cautious_scale, is_low_precision

__all__ = ["CAUTIOUS_MEAN_FLOOR", "LionHyper", "cautious_scale", "is_low_precision"]
