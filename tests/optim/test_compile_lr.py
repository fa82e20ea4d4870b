"""``torch.compile`` of ``Lion.step`` with a float lr and a per-step ``LambdaLR``.

A float lr used to be a constant of the compiled graph: every new lr value recompiled, and
after ``recompile_limit`` (8) the step silently ran uncompiled. Now, as with torch's AdamW, the
second lr value recompiles once and the lr is a graph input from then on. The compiled steps
move the parameters bitwise as the eager ones do (the gradients are computed eagerly, so only
the optimizer step is compiled), over many steps with weight decay. The momentum
m ← β2·m + (1−β2)·g differs in the last bit: eager ATen on CPU computes ``add(alpha=)`` as a
fused multiply-add and Inductor's CPU code does not (it does on CUDA); this was so before the
float-lr change too. Cautious Lion's update is not ±1, so lr·update rounds, and its parameters
differ in the last bit for the same reason.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import lionopt

STEPS = 12


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 2))


def _run(make_opt, compiled: bool):
    model = _model()
    opt = make_opt(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    step = torch.compile(opt.step) if compiled else opt.step
    g = torch.Generator().manual_seed(6)
    for _ in range(STEPS):
        x, y = torch.randn(4, 6, generator=g), torch.randn(4, 2, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        step()
        sched.step()
    return model, opt


def _graphs(make_opt) -> tuple[int, nn.Module, torch.optim.Optimizer]:
    torch._dynamo.reset()
    counters.clear()
    model, opt = _run(make_opt, compiled=True)
    return counters["stats"]["unique_graphs"], model, opt


@pytest.mark.parametrize(
    "options",
    [dict(), dict(decouple_lr=True, betas=(0.95, 0.98)), dict(cautious=True)],
    ids=["plain", "decoupled", "cautious"],
)
def test_float_lr_with_lambdalr_recompiles_once_and_matches_eager(options):
    def make(params):
        return lionopt.Lion(params, lr=1e-2, weight_decay=0.1, **options)

    graphs, model, opt = _graphs(make)
    # torch's AdamW in the same loop: 2 (benchmarks/compile_recompiles.py)
    assert graphs == 2, f"{graphs} graphs for {STEPS} lr values (1 = no recompile)"
    eager, eager_opt = _run(make, compiled=False)
    for p, q in zip(model.parameters(), eager.parameters()):
        if options.get("cautious"):  # lr·update rounds (update ≠ ±1), fused only in eager
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)
        else:
            assert torch.equal(p, q)
        torch.testing.assert_close(
            opt.state[p]["exp_avg"], eager_opt.state[q]["exp_avg"], rtol=1e-6, atol=1e-9
        )
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / (STEPS + 1))


def test_tensor_lr_does_not_recompile():
    graphs, _, _ = _graphs(
        lambda params: lionopt.Lion(params, lr=torch.tensor(1e-2), weight_decay=0.1)
    )
    assert graphs == 1
