"""The Triton kernel, run by Triton's CPU interpreter (TRITON_INTERPRET=1) in a subprocess.

The interpreter must be chosen before triton is imported, hence the subprocess. It checks the
kernel bitwise against the reference over 20 steps, one launch per step. Skipped where triton
is not installed; on a machine without CUDA, ``available()`` must say no with one warning.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from support import run_under_triton_interpreter

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)

INTERPRETER_SCRIPT = """
import torch
from lionopt.kernels.triton import plain as triton_lion
from lionopt.kernels.hyper import LionHyper
from lionopt.kernels.reference import single_tensor_lion

assert triton_lion.available()
launches = []
kernel = triton_lion._lion_kernel


class CountingKernel:
    def __getitem__(self, grid):
        launches.append(grid)
        return kernel[grid]


triton_lion._lion_kernel = CountingKernel()
SHAPES = [(3,), (1500,), (40, 33), (0,)]


def same(a, b):
    na, nb = a.isnan(), b.isnan()
    a, b = a.masked_fill(na, 0), b.masked_fill(nb, 0)
    bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(na, nb) and torch.equal(a.view(bits), b.view(bits))


def check(p_dtype, m_dtype, **options):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(p_dtype) for s in SHAPES]
    moms = [torch.zeros(s, dtype=m_dtype) for s in SHAPES]
    k_params, k_moms = [p.clone() for p in params], [m.clone() for m in moms]
    initial = [p.clone() for p in params]
    hyper = LionHyper(**{**dict(lr=3e-2, beta1=0.9, beta2=0.99, weight_decay=0.5), **options})
    launches.clear()
    for step in range(20):
        grads = [torch.randn(s, generator=gen).to(p_dtype) * (step % 3) for s in SHAPES]
        grads[1][:3] = torch.tensor([float("nan"), float("inf"), 0.0])
        grads[1][10:20] = 0
        single_tensor_lion(params, grads, moms, hyper)
        assert triton_lion.supports(k_params, grads, k_moms, hyper)
        triton_lion.lion_step(k_params, grads, k_moms, hyper)
    assert len(launches) == 20, launches  # one launch per step for all tensors
    for i, (p, kp, m, km) in enumerate(zip(params, k_params, moms, k_moms)):
        assert same(kp, p), (p_dtype, options, "param", i)
        assert same(km, m), (p_dtype, options, "momentum", i)
    assert not torch.equal(k_params[1], initial[1])  # it moved, so a wrong move would show


check(torch.float32, torch.float32)
check(torch.float32, torch.float32, maximize=True, lr=[1e-2, 2e-2, 3e-2, 4e-2])
check(torch.float32, torch.float32, cautious_weight_decay=True)
check(torch.bfloat16, torch.bfloat16)
check(torch.float16, torch.float32)

hyper = LionHyper(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0)
x = torch.zeros(8, 4)
assert not triton_lion.supports([x.t()], [x.t()], [x.t()], hyper)
assert not triton_lion.supports([x], [x], [x], LionHyper(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0, cautious=True))
d = x.double()
assert not triton_lion.supports([d], [d], [d], hyper)
print("OK")
"""


@needs_triton
def test_triton_kernel_under_the_interpreter_is_bitwise() -> None:
    run_under_triton_interpreter(INTERPRETER_SCRIPT)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_unavailable_without_cuda_warns_once(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from lionopt.kernels.triton import plain as triton_lion

    monkeypatch.setattr(triton_lion, "_state", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert triton_lion.available() is False
        assert triton_lion.available() is False
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in caught]
    assert "Triton" in str(runtime[0].message)
