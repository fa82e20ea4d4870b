"""Back-compat: moved to ``lionopt.kernels.cpu.dispatch``."""

from lionopt.kernels.cpu.dispatch import (
    DECLINED,
    NOTHING_TO_DO,
    STALE,
    STEPPED,
    available,
    build_info,
    group_step,
    lists_step,
    wait,
)

__all__ = [
    "DECLINED",
    "NOTHING_TO_DO",
    "STALE",
    "STEPPED",
    "available",
    "build_info",
    "group_step",
    "lists_step",
    "wait",
]
