"""Back-compat: moved to ``lionopt.kernels.cpu.plain``."""

from lionopt.kernels.cpu.plain import (
    SOURCE,
    available,
    build_info,
    dtype_code,
    lion_step,
    option_flags,
    stream_step,
    streamer,
    supports,
)

__all__ = [
    "SOURCE",
    "available",
    "build_info",
    "dtype_code",
    "lion_step",
    "option_flags",
    "stream_step",
    "streamer",
    "supports",
]
