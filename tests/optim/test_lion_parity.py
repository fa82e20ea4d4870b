"""Every implementation against the reference loop, on a small model, over many steps.

The model has a 0-dim parameter, a parameter that never gets a gradient, a layer that is frozen
and later unfrozen, and a step where no parameter has a gradient. Every parameter and every
state tensor is compared, bitwise: all paths run the same operations in the same order.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lionopt import Lion

from support import IMPLEMENTATIONS

STEPS = 24
FREEZE_UNTIL = 9
NO_GRAD_STEP = 5


class SmallModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.first = nn.Linear(8, 16)
        self.frozen = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.unused = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.first(x) * self.scale)
        return self.head(torch.tanh(self.frozen(hidden)))


def train(implementation: str, dtype: torch.dtype, **lion_kwargs) -> tuple[nn.Module, Lion]:
    torch.manual_seed(1234)
    model = SmallModel().to(dtype)
    opt = Lion(
        model.parameters(),
        lr=2e-2,
        betas=(0.9, 0.99),
        weight_decay=0.3,
        **IMPLEMENTATIONS[implementation],
        **lion_kwargs,
    )
    data = torch.randn(STEPS, 32, 8, dtype=dtype)
    target = torch.randn(STEPS, 32, 4, dtype=dtype)
    model.frozen.requires_grad_(False)
    for step in range(STEPS):
        if step == FREEZE_UNTIL:
            model.frozen.requires_grad_(True)
        opt.zero_grad(set_to_none=True)
        if step != NO_GRAD_STEP:
            loss = (model(data[step]) - target[step]).pow(2).mean()
            loss.backward()
        opt.step()
    return model, opt


def assert_same_training(expected: tuple[nn.Module, Lion], actual: tuple[nn.Module, Lion]) -> None:
    (model_a, opt_a), (model_b, opt_b) = expected, actual
    for (name, p_a), p_b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(p_a, p_b), name
        state_a, state_b = opt_a.state.get(p_a, {}), opt_b.state.get(p_b, {})
        assert state_a.keys() == state_b.keys(), name
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), (name, key)


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_implementation_matches_the_reference_loop(implementation, dtype):
    reference = train("loop", dtype)
    assert_same_training(reference, train(implementation, dtype))


@pytest.mark.parametrize(
    "options",
    [dict(maximize=True), dict(cautious=True), dict(cautious_weight_decay=True)],
    ids=lambda o: next(iter(o)),
)
def test_options_match_the_reference_loop(implementation, options):
    reference = train("loop", torch.float32, **options)
    assert_same_training(reference, train(implementation, torch.float32, **options))


def test_training_really_changed_the_model():
    """Guards the parity tests against comparing two models that never moved."""
    torch.manual_seed(1234)
    untouched = SmallModel()
    model, opt = train("loop", torch.float32)
    assert not torch.equal(untouched.first.weight, model.first.weight)
    assert not torch.equal(untouched.frozen.weight, model.frozen.weight)
    assert torch.equal(untouched.unused, model.unused)
    assert model.unused not in opt.state
    assert model.scale in opt.state


def test_frozen_layer_gets_no_state_until_unfrozen():
    torch.manual_seed(0)
    model = SmallModel()
    opt = Lion(model.parameters(), lr=1e-2)
    model.frozen.requires_grad_(False)
    frozen_before = model.frozen.weight.detach().clone()
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    assert model.frozen.weight not in opt.state
    assert torch.equal(model.frozen.weight, frozen_before)


def test_mixed_dtypes_in_one_group_are_grouped():
    """fp32, fp64 and bf16 parameters in one group: each updated as it would be alone."""
    torch.manual_seed(3)
    tensors = [torch.randn(10), torch.randn(7, dtype=torch.float64), torch.randn(5).bfloat16()]
    grads = [torch.randn_like(t) for t in tensors]
    together = [nn.Parameter(t.clone()) for t in tensors]
    alone = [nn.Parameter(t.clone()) for t in tensors]
    opt = Lion(together, lr=0.1, weight_decay=0.2)
    opts = [Lion([p], lr=0.1, weight_decay=0.2, foreach=False, fused=False) for p in alone]
    for _ in range(5):
        for p, q, g in zip(together, alone, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        for o in opts:
            o.step()
    for p, q in zip(together, alone):
        assert p.dtype == q.dtype
        assert torch.equal(p, q)
