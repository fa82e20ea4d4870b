"""Back-compat: moved to ``lionopt.kernels.cpu._build``."""

from lionopt.kernels.cpu._build import *  # noqa: F403
from lionopt.kernels.cpu._build import Build, BuildOptions, LazyLibrary  # noqa: F401
