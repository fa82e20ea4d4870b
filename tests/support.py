"""Helpers shared by the test modules (importable as ``support``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

from lionopt.kernels import registry

# (foreach, fused) settings that select each implementation of the functional step.
IMPLEMENTATIONS = {
    "loop": dict(foreach=False, fused=False),
    "foreach": dict(foreach=True, fused=False),
    "fused": dict(foreach=False, fused=True),
}


def fused_available(device_type: str = "cpu") -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return registry.fused_available(device_type)


def run_under_triton_interpreter(script: str) -> None:
    """Run ``script`` in a fresh Python with TRITON_INTERPRET=1 (set before triton is imported)
    and require that it exits 0 after printing OK."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
