"""Lion against the independent float64 golden model, over many steps, never re-synced."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from lionopt import Lion
from lionopt.functional import lion

from golden import golden_lion_step
from support import IMPLEMENTATIONS

STEPS = 30
HYPER = dict(lr=3e-2, betas=(0.9, 0.99), weight_decay=0.5)


def adversarial_grads(step: int, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random gradients, with some steps all-zero and some coordinates 0, ±inf or NaN."""
    grad = rng.standard_normal(shape)
    if step % 7 == 3:
        return np.zeros(shape)
    flat = grad.reshape(-1)
    flat[rng.random(flat.size) < 0.2] = 0.0
    if step == 11:
        flat[0] = np.nan
    if step == 13 and flat.size > 2:
        flat[1] = np.inf
        flat[2] = -np.inf
    return grad


def test_golden_float64_many_steps_adversarial(implementation):
    rng = np.random.default_rng(1)
    shapes = [(17, 5), (300,), ()]
    thetas = [rng.standard_normal(s) for s in shapes]
    moms = [np.zeros(s) for s in shapes]
    params = [torch.nn.Parameter(torch.from_numpy(t.copy())) for t in thetas]
    opt = Lion(params, **HYPER, **IMPLEMENTATIONS[implementation])

    for step in range(STEPS):
        grads = [adversarial_grads(step, s, rng) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
        for i, g in enumerate(grads):
            thetas[i], moms[i] = golden_lion_step(
                thetas[i],
                moms[i],
                g,
                lr=HYPER["lr"],
                beta1=HYPER["betas"][0],
                beta2=HYPER["betas"][1],
                weight_decay=HYPER["weight_decay"],
            )
        for p, theta, mom in zip(params, thetas, moms):
            # torch fuses the momentum's multiply-add; allow a few float64 ULP.
            assert_allclose(p.detach().numpy(), theta, rtol=1e-13, atol=1e-15)
            assert_allclose(opt.state[p]["exp_avg"].numpy(), mom, rtol=1e-13, atol=1e-15)

    # The adversarial values really happened: NaN momentum sticks, inf momentum sticks.
    assert np.isnan(moms[0].reshape(-1)[0])
    assert np.isinf(moms[0].reshape(-1)[1])


def test_ties_do_not_move_the_weight():
    """c = β1·m + (1-β1)·g == 0 exactly: sign(0) = 0, so only decay applies."""
    theta = torch.tensor([0.5, -0.25, 1.0], dtype=torch.float64)
    momentum = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    grad = -momentum  # with β1 = 0.5, c = 0.5·m − 0.5·m = 0
    lion([theta], [grad], [momentum], lr=0.1, beta1=0.5, beta2=0.9, weight_decay=0.0)
    assert theta.tolist() == [0.5, -0.25, 1.0]


def test_zero_gradient_zero_momentum_only_decays(implementation):
    theta = torch.nn.Parameter(torch.tensor([2.0, -4.0, 0.0]))
    opt = Lion([theta], lr=0.25, weight_decay=0.5, **IMPLEMENTATIONS[implementation])
    theta.grad = torch.zeros(3)
    opt.step()
    factor = 1 - 0.25 * 0.5
    assert theta.tolist() == [2.0 * factor, -4.0 * factor, 0.0]


def test_nan_gradient_behaves_like_the_eager_reference(implementation):
    """torch.sign(NaN) = 0: the coordinate only decays and its momentum becomes NaN.

    It is never turned into a ±lr update.
    """
    theta = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0]))
    opt = Lion([theta], lr=0.5, weight_decay=0.0, **IMPLEMENTATIONS[implementation])
    theta.grad = torch.tensor([float("nan"), float("inf"), -float("inf")])
    opt.step()
    assert theta.tolist() == [1.0, 0.5, 1.5]
    momentum = opt.state[theta]["exp_avg"]
    assert torch.isnan(momentum[0]) and momentum[1] == float("inf") and momentum[2] == -float("inf")


@pytest.mark.parametrize("maximize", [False, True])
def test_maximize_matches_golden(maximize):
    rng = np.random.default_rng(2)
    theta, mom = rng.standard_normal(50), np.zeros(50)
    param = torch.nn.Parameter(torch.from_numpy(theta.copy()))
    opt = Lion([param], lr=0.01, betas=(0.8, 0.95), weight_decay=0.1, maximize=maximize)
    for _ in range(25):
        grad = rng.standard_normal(50)
        param.grad = torch.from_numpy(grad.copy())
        opt.step()
        theta, mom = golden_lion_step(
            theta, mom, grad, lr=0.01, beta1=0.8, beta2=0.95, weight_decay=0.1, maximize=maximize
        )
    assert_allclose(param.detach().numpy(), theta, rtol=1e-13)
