"""Shared pytest fixtures for the lionopt test suite."""

from __future__ import annotations

import os

import pytest
import torch

from support import IMPLEMENTATIONS, fused_available


@pytest.fixture(params=list(IMPLEMENTATIONS))
def implementation(request) -> str:
    """Each implementation name; 'fused' is skipped where no fused kernel can run here."""
    if request.param == "fused" and not fused_available("cpu"):
        if os.environ.get("LIONOPT_REQUIRE_FUSED") == "1":
            pytest.fail("LIONOPT_REQUIRE_FUSED=1 but the fused CPU kernel is unavailable")
        pytest.skip("the fused CPU kernel cannot be built on this machine")
    return request.param


@pytest.fixture(scope="session", autouse=True)
def _cpu_dispatch_built() -> None:
    """Wait for the C++ dispatch's background build, so every test sees the same paths."""
    if not fused_available("cpu"):
        return
    from lionopt.kernels.cpu import dispatch as cpu_dispatch

    if not cpu_dispatch.wait() and os.environ.get("LIONOPT_REQUIRE_FUSED") == "1":
        pytest.fail("LIONOPT_REQUIRE_FUSED=1 but the C++ dispatch did not build")


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
