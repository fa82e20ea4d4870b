"""The Triton 8-bit-momentum and stochastic-rounding kernels, run by Triton's CPU interpreter.

As in ``test_triton.py``, a subprocess sets ``TRITON_INTERPRET=1`` before triton is imported
and runs CPU tensors through ``triton_quant``; every step is compared bitwise with the torch
definition (``quantized.quantized_lion_loop``, the reference loop with ``rounding_keys``):
10 steps, weight decay, NaN/inf/zero gradients, partial blocks, bf16 weights rounded
stochastically with a new key per step. Skipped where triton is not installed.
"""

from __future__ import annotations

import importlib.util

import pytest

from support import run_under_triton_interpreter

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)

INTERPRETER_SCRIPT = """
import torch
from lionopt.kernels import registry
from lionopt.kernels.triton import quant as triton_quant
from lionopt.kernels.hyper import LionHyper
from lionopt.kernels.reference import quantized_lion_loop
from lionopt.state.int8 import quantize
from lionopt.kernels.reference import single_tensor_lion
from lionopt.kernels.rounding import rounding_key

assert triton_quant.available()
assert any(b.name == "cuda-rounding" for b in registry.backends("cuda"))
launches = []
kernel = triton_quant._quant_kernel


class CountingKernel:
    def __getitem__(self, grid):
        launches.append(grid)
        return kernel[grid]


triton_quant._quant_kernel = CountingKernel()
QUANT_SHAPES = [(4196,), (70, 61), (300,)]  # 4196 and 4270 end in partial blocks
PLAIN_SHAPES = [(3,), (1500,), (40, 33), (0,)]
STEPS = 10


def same(a, b):
    na, nb = a.isnan(), b.isnan()
    a, b = a.masked_fill(na, 0), b.masked_fill(nb, 0)
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(na, nb) and torch.equal(a.view(bits), b.view(bits))


def grads_for(shapes, dtype, step, gen):
    grads = [torch.randn(s, generator=gen).to(dtype) * (1 + step % 3) for s in shapes]
    if step % 4 == 1:
        grads[0][5:9] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    if step == 2:
        grads[1].view(-1)[256:512] = float("nan")  # a whole block of NaN codes
    grads[0][600:700] = 0
    return grads


def hyper_for(step, count, stochastic, options):
    keys = [rounding_key(7, step, i) for i in range(count)] if stochastic else None
    base = dict(lr=3e-2, beta1=0.9, beta2=0.99, weight_decay=0.5, rounding_keys=keys)
    return LionHyper(**{**base, **options})


def check_quant(p_dtype, stochastic=False, **options):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(p_dtype) for s in QUANT_SHAPES]
    codes, scales = map(list, zip(*(quantize(0.1 * torch.randn(s, generator=gen)) for s in QUANT_SHAPES)))
    codes[0][4196:] = 100  # odd padding: kept as its dequantised value, counted in the absmax
    k = [[t.clone() for t in ts] for ts in (params, codes, scales)]
    initial = [p.clone() for p in params]
    launches.clear()
    for step in range(STEPS):
        grads = grads_for(QUANT_SHAPES, p_dtype, step, gen)
        hyper = hyper_for(step, len(params), stochastic, options)
        quantized_lion_loop(params, grads, codes, scales, hyper)
        assert triton_quant.supports(k[0], grads, k[1], hyper, scales=k[2])
        triton_quant.lion_step(k[0], grads, k[1], hyper, scales=k[2])
        for name, ref, got in zip(("param", "codes", "scales"), (params, codes, scales), k):
            for i, (r, g) in enumerate(zip(ref, got)):
                assert same(g, r), (p_dtype, stochastic, options, step, name, i)
    assert len(launches) == STEPS, launches  # one launch per step for all tensors
    assert (codes[0] == -128).any() and (codes[0] != -128).any()  # NaN codes were exercised
    assert not torch.equal(params[0], initial[0])


def check_plain(p_dtype, m_dtype, stochastic=False, **options):
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen).to(p_dtype) for s in PLAIN_SHAPES]
    moms = [torch.zeros(s, dtype=m_dtype) for s in PLAIN_SHAPES]
    k_params, k_moms = [p.clone() for p in params], [m.clone() for m in moms]
    initial = [p.clone() for p in params]
    launches.clear()
    for step in range(STEPS):
        grads = grads_for(PLAIN_SHAPES[1:], p_dtype, step, gen)
        grads = [torch.randn(3, generator=gen).to(p_dtype), *grads]
        hyper = hyper_for(step, len(params), stochastic, options)
        single_tensor_lion(params, grads, moms, hyper)
        assert triton_quant.supports(k_params, grads, k_moms, hyper)
        triton_quant.lion_step(k_params, grads, k_moms, hyper)
    assert len(launches) == STEPS, launches
    for i, (p, kp, m, km) in enumerate(zip(params, k_params, moms, k_moms)):
        assert same(kp, p), (p_dtype, m_dtype, stochastic, options, "param", i)
        assert same(km, m), (p_dtype, m_dtype, stochastic, options, "momentum", i)
    assert not torch.equal(k_params[1], initial[1])


check_quant(torch.float32)
check_quant(torch.float32, maximize=True, lr=[1e-2, 2e-2, 3e-2], cautious_weight_decay=True)
check_quant(torch.bfloat16)
check_quant(torch.bfloat16, stochastic=True)
check_plain(torch.bfloat16, torch.bfloat16, stochastic=True)
check_plain(torch.bfloat16, torch.float32, stochastic=True, maximize=True, lr=[1e-2, 2e-2, 3e-2, 4e-2])
check_plain(torch.float32, torch.bfloat16)

# Declines: cautious, fp16, non-contiguous, wrong padding, codes of another dtype.
hyper = LionHyper(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0)
p = torch.zeros(300)
codes, scales = quantize(p)
assert not triton_quant.supports([p], [p], [codes], LionHyper(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0, cautious=True), scales=[scales])
assert not triton_quant.supports([p.half()], [p.half()], [codes], hyper, scales=[scales])
assert not triton_quant.supports([p], [p], [codes[:256]], hyper, scales=[scales[:1]])
assert not triton_quant.supports([p], [p], [codes.float()], hyper, scales=[scales])
x = torch.zeros(8, 4)
assert not triton_quant.supports([x.t()], [x.t()], [x.t()], hyper)
print("OK")
"""


@needs_triton
def test_triton_quant_kernels_under_the_interpreter_are_bitwise() -> None:
    run_under_triton_interpreter(INTERPRETER_SCRIPT)
