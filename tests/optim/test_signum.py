"""Signum: exact against an independent float64 Signum, and bitwise equal to Lion(β, β)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lionopt import Lion
from lionopt.optim import Signum

from support import IMPLEMENTATIONS

pytestmark = pytest.mark.filterwarnings("ignore:lionopt.*fused:RuntimeWarning")

SHAPES = [(7, 5), (13,), ()]


def golden_signum(thetas, grads_fn, steps, *, lr, beta, weight_decay):
    """Signum as Bernstein et al. write it (momentum first), with decoupled decay, float64."""
    thetas = [t.clone() for t in thetas]
    moms = [torch.zeros_like(t) for t in thetas]
    for step in range(steps):
        for i, theta in enumerate(thetas):
            g = grads_fn(i, theta, step)
            moms[i] = beta * moms[i] + (1 - beta) * g
            thetas[i] = theta * (1 - lr * weight_decay) - lr * torch.sign(moms[i])
    return thetas, moms


def grads_fn(i: int, theta: torch.Tensor, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * step + i)
    return theta - 0.3 + torch.randn(theta.shape, generator=gen, dtype=theta.dtype)


def run(opt_factory, steps: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]
    opt = opt_factory(params)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = grads_fn(i, p.detach(), step)
        opt.step()
    return params, opt


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_signum_matches_independent_float64_signum(implementation: str) -> None:
    hyper = dict(lr=1e-2, beta=0.9, weight_decay=0.5)
    params, opt = run(lambda ps: Signum(ps, **hyper, **IMPLEMENTATIONS[implementation]), 60)
    init = [p.detach() for p in run(lambda ps: Signum(ps), 0)[0]]
    thetas, moms = golden_signum(init, grads_fn, 60, **hyper)
    for p, theta, m in zip(params, thetas, moms, strict=True):
        torch.testing.assert_close(p.detach(), theta, rtol=0, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=0, atol=1e-14)


@settings(max_examples=20, deadline=None)
@given(
    beta=st.floats(0.0, 0.999),
    lr=st.floats(1e-5, 1e-1),
    weight_decay=st.floats(0.0, 5.0),
    implementation=st.sampled_from(list(IMPLEMENTATIONS)),
)
def test_signum_is_lion_with_equal_betas_bitwise(beta, lr, weight_decay, implementation) -> None:
    flags = IMPLEMENTATIONS[implementation]
    hyper = dict(lr=lr, weight_decay=weight_decay, **flags)
    a, opt_a = run(lambda ps: Signum(ps, beta=beta, **hyper), 20, torch.float32)
    b, opt_b = run(lambda ps: Lion(ps, betas=(beta, beta), **hyper), 20, torch.float32)
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt_a.state[p]["exp_avg"], opt_b.state[q]["exp_avg"])


def test_signum_is_a_lion_and_validates_beta() -> None:
    p = nn.Parameter(torch.zeros(3))
    opt = Signum([p], lr=1e-3, beta=0.8, weight_decay=0.1, cautious=True)
    assert isinstance(opt, Lion)
    assert opt.param_groups[0]["betas"] == (0.8, 0.8)
    assert opt.param_groups[0]["cautious"] is True
    with pytest.raises(ValueError, match="Invalid beta parameter"):
        Signum([p], beta=1.0)
