"""``torch.compile`` keeps the fused CPU kernel: the custom op ``lionopt::lion_step_``.

A compiled ``opt.step()`` must call the fused kernel as one node
of one graph, with no graph break, and give bitwise the parameters and momenta of the eager
fused step (the op's implementation is that step). Groups the op does not take (8-bit,
stochastic rounding, ``fused=False``) trace through foreach as before. (An Inductor-compiled
training step is ``tests/optim/test_lion_api.py::test_torch_compile_of_a_training_step``.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lionopt import Lion
from lionopt.kernels.cpu import plain

from support import fused_available

pytestmark = pytest.mark.skipif(not fused_available("cpu"), reason="no fused CPU kernel here")


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = plain.lion_step

    def spy(*args):
        calls.append(len(args[0]))
        return original(*args)

    monkeypatch.setattr(plain, "lion_step", spy)
    return calls


def _params(seed: int) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in [(64, 32), (32,), (5,)]]


@pytest.mark.parametrize("options", [{}, {"cautious": True, "maximize": True}])
def test_compiled_step_calls_the_kernel_in_one_graph_bitwise(kernel_calls, options) -> None:
    params, twins = _params(0), _params(0)
    opt = Lion(params, lr=1e-2, weight_decay=0.5, **options)
    ref = Lion(twins, lr=1e-2, weight_decay=0.5, foreach=True, **options)
    compiled = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        for group in (*opt.param_groups, *ref.param_groups):
            group["lr"] = 1e-2 * (1 + step / 8)  # a schedule: the lr is a graph input
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        compiled()
        ref.step()
    assert kernel_calls == [3] * 4
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"])


def test_groups_the_op_does_not_take_trace_through_foreach(kernel_calls) -> None:
    params = [nn.Parameter(torch.randn(64, 80))]
    opt = Lion(params, lr=1e-2, weight_decay=0.5, momentum_dtype="int8")
    compiled = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        params[0].grad = torch.randn_like(params[0])
        compiled()
    assert kernel_calls == []
    assert opt.state[params[0]]["exp_avg"].dtype == torch.int8


def test_compiled_step_takes_a_one_element_tensor_lr(kernel_calls) -> None:
    """``lr=torch.tensor([x])`` is one lr for the whole group, compiled as in eager."""
    params, twins = _params(2), _params(2)
    opt = Lion(params, lr=torch.tensor([1e-2]), weight_decay=0.5)
    ref = Lion(twins, lr=1e-2, weight_decay=0.5, foreach=True)
    compiled = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        compiled()
        ref.step()
    assert kernel_calls == [3] * 2
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
