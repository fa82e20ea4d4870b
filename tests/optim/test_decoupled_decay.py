"""Fully decoupled weight decay (``decouple_lr``): per-step decay λ·lr_t/max_lr, max_lr per group.

The defect this guards against (notes §5): a divisor shared across groups (the constructor lr)
zeroes the weights of a group with a larger lr in one step, and a divisor not in the state dict
changes when training resumes with a different lr.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lionopt import Lion

from support import IMPLEMENTATIONS

pytestmark = pytest.mark.filterwarnings("ignore:lionopt.*fused:RuntimeWarning")

BETAS, DECAY, STEPS = (0.9, 0.99), 0.1, 30
GROUP_LRS = (1e-2, 1e-3)  # the constructor lr below is 1e-3: group 0 has a 10x larger lr


def schedule(step: int) -> float:
    """Warmup for 5 steps, then a linear decay: the lr is below max_lr most of the time."""
    return (step + 1) / 5 if step < 5 else max(0.1, 1.0 - (step - 5) / 30)


def gradient(i: int, theta: torch.Tensor, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(10 * step + i)
    return theta - 0.5 + torch.randn(theta.shape, generator=gen, dtype=theta.dtype)


def make_params(dtype=torch.float64) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(5)
    return [nn.Parameter(torch.randn(8, 3, generator=gen, dtype=dtype)) for _ in GROUP_LRS]


def make_optimizer(params, implementation: str, lr: float = 1e-3) -> Lion:
    groups = [
        {"params": [p], "lr": group_lr} for p, group_lr in zip(params, GROUP_LRS, strict=True)
    ]
    return Lion(
        groups,
        lr=lr,
        betas=BETAS,
        weight_decay=DECAY,
        decouple_lr=True,
        **IMPLEMENTATIONS[implementation],
    )


def train(params, opt, scheduler, start: int, stop: int) -> None:
    for step in range(start, stop):
        for i, p in enumerate(params):
            p.grad = gradient(i, p.detach(), step)
        opt.step()
        scheduler.step()


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_golden_float64_two_groups(implementation: str) -> None:
    params = make_params()
    thetas = [p.detach().clone() for p in params]
    moms = [torch.zeros_like(t) for t in thetas]
    opt = make_optimizer(params, implementation)
    scheduler = LambdaLR(opt, schedule)
    train(params, opt, scheduler, 0, STEPS)

    beta1, beta2 = BETAS
    for step in range(STEPS):
        for i, max_lr in enumerate(GROUP_LRS):
            lr = max_lr * schedule(step)
            g = gradient(i, thetas[i], step)
            c = beta1 * moms[i] + (1 - beta1) * g
            thetas[i] = thetas[i] * (1 - DECAY * lr / max_lr) - lr * torch.sign(c)
            moms[i] = beta2 * moms[i] + (1 - beta2) * g
    for p, theta, m in zip(params, thetas, moms, strict=True):
        torch.testing.assert_close(p.detach(), theta, rtol=0, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=0, atol=1e-14)
    for p in params:  # neither group was zeroed (the shared-divisor defect)
        assert p.detach().abs().min() > 1e-3


def test_each_group_has_its_own_divisor() -> None:
    params = [nn.Parameter(torch.ones(4)) for _ in GROUP_LRS]
    opt = make_optimizer(params, "foreach")
    assert [g["max_lr"] for g in opt.param_groups] == list(GROUP_LRS)
    for p in params:
        p.grad = torch.zeros(4)  # zero gradient and momentum: only the decay acts
    opt.step()
    for p in params:
        torch.testing.assert_close(p.detach(), torch.full((4,), 1 - DECAY))


def test_explicit_max_lr_is_the_divisor() -> None:
    p = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = Lion([p], lr=1e-2, weight_decay=0.1, decouple_lr=True, max_lr=2e-2)
    p.grad = torch.zeros(3, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 1 - 0.1 * 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="Invalid max_lr value"):
        Lion([p], decouple_lr=True, max_lr=0.0)


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_state_dict_round_trip_with_changed_lr(implementation: str) -> None:
    split = 17
    whole = make_params(torch.float32)
    whole_opt = make_optimizer(whole, implementation)
    train(whole, whole_opt, LambdaLR(whole_opt, schedule), 0, STEPS)

    first = make_params(torch.float32)
    first_opt = make_optimizer(first, implementation)
    first_scheduler = LambdaLR(first_opt, schedule)
    train(first, first_opt, first_scheduler, 0, split)
    saved_opt = copy.deepcopy(first_opt.state_dict())
    saved_scheduler = copy.deepcopy(first_scheduler.state_dict())
    assert [g["lr"] for g in saved_opt["param_groups"]] != list(GROUP_LRS)  # lr has moved

    # Resume in a fresh process: other constructor lr, other group lrs, standard load order.
    resumed = [nn.Parameter(p.detach().clone()) for p in first]
    fresh = Lion(
        [{"params": [p], "lr": 0.5} for p in resumed],
        lr=0.25,
        betas=BETAS,
        weight_decay=DECAY,
        decouple_lr=True,
        **IMPLEMENTATIONS[implementation],
    )
    scheduler = LambdaLR(fresh, schedule)
    fresh.load_state_dict(saved_opt)
    scheduler.load_state_dict(saved_scheduler)
    assert [g["max_lr"] for g in fresh.param_groups] == list(GROUP_LRS)
    train(resumed, fresh, scheduler, split, STEPS)
    for p, q in zip(whole, resumed, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(whole_opt.state[p]["exp_avg"], fresh.state[q]["exp_avg"])


@settings(max_examples=30, deadline=None)
@given(
    scale=st.floats(1e-4, 1e2),
    weight_decay=st.floats(0.0, 0.5),
    multipliers=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8),
)
def test_decay_follows_the_schedule_not_the_lr_scale(scale, weight_decay, multipliers) -> None:
    p = nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = Lion([p], lr=scale, weight_decay=weight_decay, decouple_lr=True)
    expected = 1.0
    for multiplier in multipliers:
        opt.param_groups[0]["lr"] = scale * multiplier
        p.grad = torch.zeros(2, dtype=torch.float64)
        opt.step()
        expected *= 1 - weight_decay * multiplier
    torch.testing.assert_close(p.detach(), torch.full((2,), expected, dtype=torch.float64))


def test_lr_zero_needs_an_explicit_max_lr() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="pass max_lr"):
        Lion([p], lr=0.0, weight_decay=0.1, decouple_lr=True)
    opt = Lion([p], lr=0.0, weight_decay=0.1, decouple_lr=True, max_lr=1e-3)
    p.grad = torch.ones(3)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3))
