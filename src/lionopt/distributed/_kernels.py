"""Which fused kernel runs a bucket's two passes: C++ on CPU, Triton on CUDA, or none.

Both kernel modules have the signatures of ``voting.sign_pass`` and ``voting.apply_pass`` and
are imported lazily; a kernel that cannot be built warns once and the torch passes run.
"""

from __future__ import annotations

import warnings

from torch import Tensor

_warned: set[str] = set()


def warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"lionopt.distributed: {reason}; using torch ops", RuntimeWarning, 3)


def select(params: list[Tensor], grads: list[Tensor | None], exp_avgs: list[Tensor]):
    """The kernel module that takes every tensor of this bucket, or None."""
    if not params:
        return None
    device = params[0].device.type
    if device == "cpu":
        from lionopt.kernels.cpu import signpack as kernel
    elif device == "cuda":
        from lionopt.kernels.triton import signpack as kernel
    else:
        return None
    if not kernel.supports(params, grads, exp_avgs) or not kernel.available():
        return None
    return kernel
