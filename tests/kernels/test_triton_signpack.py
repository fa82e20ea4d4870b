"""Distributed Lion's Triton passes, run by Triton's CPU interpreter (TRITON_INTERPRET=1).

In a subprocess (the interpreter must be chosen before triton is imported): both passes against
the torch passes of ``lionopt.distributed.voting``, bitwise, for 2-bit and int8 signs, every
result format and both votes, with a missing gradient, exact zeros, NaN and an empty tensor,
over 12 steps of a pass-1/pass-2 loop.
"""

from __future__ import annotations

import importlib.util

import pytest

from support import run_under_triton_interpreter

SCRIPT = """
import torch
from lionopt.distributed import voting
from lionopt.kernels.triton import signpack

assert signpack.available()
shapes = [(3,), (1500,), (40, 33), (0,), (2100,)]
gen = torch.Generator().manual_seed(0)
offsets, total = [], 0
for s in shapes:
    offsets.append(total)
    total += -(-torch.Size(s).numel() // 8) * 8
numel = -(-total // 24) * 24
formats = [voting.SIGN2, voting.SIGN1, voting.RAW8, voting.ResultFormat(4, 2, -4)]
for width in (2, 8):
    params = [torch.randn(s, generator=gen) for s in shapes]
    moms = [torch.zeros(s) for s in shapes]
    kp, km = [p.clone() for p in params], [m.clone() for m in moms]
    for step in range(12):
        grads = [torch.randn(s, generator=gen) * (step % 3) for s in shapes]
        grads[1][:3] = torch.tensor([float("nan"), 0.0, float("inf")])
        if step % 4 == 1:
            grads[2] = None
        a, za = voting.sign_pass(params, grads, moms, offsets, numel, 0.9, 0.99, width, True)
        b, zb = signpack.sign_pass(kp, grads, km, offsets, numel, 0.9, 0.99, width, True)
        assert torch.equal(a, b), (width, step)
        assert za == zb, (za, zb)
        for x, y in zip(moms, km):
            assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0))
        fmt = formats[step % len(formats)]
        vote = ("majority", "average")[step % 2]
        if fmt.width == 8:
            codes = torch.randint(-4, 5, (numel,), generator=gen, dtype=torch.int8)
            codes = codes.view(torch.uint8)
        else:
            codes = torch.randint(0, 256, (numel * fmt.width // 8,), generator=gen,
                                  dtype=torch.uint8)
        lrs, wds = [0.1, 0.2, 0.1, 0.1, 0.3], [0.3, 0.0, 0.3, 0.3, 1.0]
        voting.apply_pass(params, offsets, lrs, wds, codes, fmt, vote, 4)
        signpack.apply_pass(kp, offsets, lrs, wds, codes, fmt, vote, 4)
        for x, y in zip(params, kp):
            assert torch.equal(x, y), (fmt, vote, step)
print("OK")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_signpack_under_the_interpreter():
    run_under_triton_interpreter(SCRIPT)
