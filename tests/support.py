"""Helpers shared by the test modules (importable as ``support``)."""

from __future__ import annotations

import warnings

from lionopt import functional

# (foreach, fused) settings that select each implementation of the functional step.
IMPLEMENTATIONS = {
    "loop": dict(foreach=False, fused=False),
    "foreach": dict(foreach=True, fused=False),
    "fused": dict(foreach=False, fused=True),
}


def fused_available(device_type: str = "cpu") -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return functional._fused_backend(device_type, explicit=False) is not None
