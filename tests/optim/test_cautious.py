"""Cautious Lion and cautious weight decay: float64 golden math on every implementation.

Cautious Lion (arXiv 2411.16085): φ = 1[sign(c)·g > 0]; update = sign(c)·φ / max(mean(φ), 1e-3)
per tensor; the decay is not masked. Cautious weight decay (arXiv 2510.12402): decay only
where sign(θ) equals the (masked) update direction, which is non-zero there.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lionopt import Lion

from support import IMPLEMENTATIONS

pytestmark = pytest.mark.filterwarnings("ignore:lionopt.*fused:RuntimeWarning")

LR, BETAS, DECAY, STEPS = 1e-2, (0.9, 0.99), 0.4, 25
SHAPES = [(6, 5), (11,), ()]


def golden_step(theta, m, g, *, cautious: bool, cautious_weight_decay: bool):
    """One step of (cautious) Lion in float64, written from the papers' formulas."""
    beta1, beta2 = BETAS
    c = beta1 * m + (1 - beta1) * g
    direction = torch.sign(c)
    update = direction
    if cautious:
        mask = (direction * g > 0).double()
        direction = direction * mask
        update = direction / torch.clamp(mask.mean(), min=1e-3)
    if cautious_weight_decay:
        decay_here = direction * theta >= 0  # Algorithm 1 of arXiv 2510.12402: I(u·θ ≥ 0)
        theta = torch.where(decay_here, theta * (1 - LR * DECAY), theta)
    else:
        theta = theta * (1 - LR * DECAY)
    theta = theta - LR * update
    m = beta2 * m + (1 - beta2) * g
    return theta, m


def gradient(i: int, theta: torch.Tensor, step: int) -> torch.Tensor:
    """Depends on theta; about 20% exact zeros (sign(c)·0 = 0: masked), and all zero at step 3."""
    gen = torch.Generator().manual_seed(50 * step + i)
    g = (theta - 0.1) + torch.randn(theta.shape, generator=gen, dtype=theta.dtype)
    zeros = torch.rand(theta.shape, generator=gen) < 0.2
    return torch.where(zeros | (step == 3), torch.zeros_like(g), g)


def initial(dtype=torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]


def run_lion(implementation: str, steps: int, grad_fn=gradient, dtype=torch.float64, **flags):
    params = [nn.Parameter(t) for t in initial(dtype)]
    opt = Lion(
        params, lr=LR, betas=BETAS, weight_decay=DECAY, **IMPLEMENTATIONS[implementation], **flags
    )
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = grad_fn(i, p.detach(), step)
        opt.step()
    return params, opt


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize(
    ("cautious", "cautious_weight_decay"), [(True, False), (False, True), (True, True)]
)
def test_golden_float64(implementation: str, cautious: bool, cautious_weight_decay: bool) -> None:
    flags = dict(cautious=cautious, cautious_weight_decay=cautious_weight_decay)
    params, opt = run_lion(implementation, STEPS, **flags)
    thetas, moms = initial(), [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    masked_fraction = []
    for step in range(STEPS):
        for i in range(len(thetas)):
            g = gradient(i, thetas[i], step)
            c = BETAS[0] * moms[i] + (1 - BETAS[0]) * g
            masked_fraction.append((torch.sign(c) * g <= 0).double().mean().item())
            thetas[i], moms[i] = golden_step(thetas[i], moms[i], g, **flags)
    assert 0.05 < sum(masked_fraction) / len(masked_fraction) < 0.95  # the masks do something
    for p, theta, m in zip(params, thetas, moms, strict=True):
        torch.testing.assert_close(p.detach(), theta, rtol=0, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=0, atol=1e-14)


def agreeing_gradient(i: int, theta: torch.Tensor, step: int) -> torch.Tensor:
    """No zeros, and one fixed sign per coordinate: from m = 0, sign(c) = sign(g) always."""
    gen = torch.Generator().manual_seed(7 + i)
    signs = torch.where(torch.rand(theta.shape, generator=gen) < 0.5, -1.0, 1.0)
    step_gen = torch.Generator().manual_seed(1000 * step + i)
    magnitude = 0.1 + torch.rand(theta.shape, generator=step_gen)
    return (signs * magnitude).to(theta.dtype)


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cautious_with_agreeing_signs_is_plain_lion_bitwise(implementation, dtype) -> None:
    plain, plain_opt = run_lion(implementation, STEPS, agreeing_gradient, dtype)
    careful, careful_opt = run_lion(implementation, STEPS, agreeing_gradient, dtype, cautious=True)
    for p, q in zip(plain, careful, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(plain_opt.state[p]["exp_avg"], careful_opt.state[q]["exp_avg"])


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_mean_is_clamped_at_one_thousandth(implementation: str) -> None:
    # 10 000 coordinates, one agreeing: mean(φ) = 1e-4 is clamped to 1e-3, a 1000x update.
    n = 10_000
    p = nn.Parameter(torch.zeros(n, dtype=torch.float64))
    opt = Lion([p], lr=1e-6, betas=(0.9, 0.99), cautious=True, **IMPLEMENTATIONS[implementation])
    opt.state[p]["exp_avg"] = torch.ones(n, dtype=torch.float64)
    g = torch.full((n,), -0.5, dtype=torch.float64)
    g[17] = 0.5  # c = 0.9 - 0.05 > 0 everywhere, agreeing with g only here
    p.grad = g
    opt.step()
    expected = torch.zeros(n, dtype=torch.float64)
    expected[17] = -1e-6 * 1000
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), beta1=st.floats(0.0, 0.99), beta2=st.floats(0.0, 0.999))
def test_cautious_never_steps_against_the_gradient(seed: int, beta1: float, beta2: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    p = nn.Parameter(torch.randn(200, generator=gen, dtype=torch.float64))
    opt = Lion([p], lr=1e-3, betas=(beta1, beta2), cautious=True)
    for _ in range(5):
        g = torch.randn(200, generator=gen, dtype=torch.float64)
        before = p.detach().clone()
        p.grad = g
        opt.step()
        assert ((p.detach() - before) * g <= 0).all()


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_cautious_weight_decay_follows_the_papers_indicator(implementation: str) -> None:
    """Decay where u·θ ≥ 0: a zero update decays, an update pushing θ away from 0 does not."""
    theta = nn.Parameter(torch.tensor([2.0, 2.0, -2.0, 2.0]))
    opt = Lion(
        [theta],
        lr=0.125,
        weight_decay=0.5,
        cautious_weight_decay=True,
        **IMPLEMENTATIONS[implementation],
    )
    # c = 0.1·g here: u = sign(g) = 0, +1 (toward 0), +1 (away from 0), -1 (away from 0).
    theta.grad = torch.tensor([0.0, 1.0, 1.0, -1.0])
    opt.step()
    decay = 1 - 0.125 * 0.5
    expected = [2.0 * decay, 2.0 * decay - 0.125, -2.0 - 0.125, 2.0 + 0.125]
    assert theta.tolist() == expected
