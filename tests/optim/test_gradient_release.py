"""Gradient release (``step_in_backward=True``) on Lion, Signum and Tiger.

Every case trains a small model with an LR scheduler and weight decay both ways, and the
released run must equal the ordinary one bitwise (parameters and momenta) on every path;
the gradients must be freed during backward. Also: a float64 run against Lion written out
independently, resume through state_dict, micro-batch accumulation, Tiger's accum_steps, and
the errors.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn

import lionopt

from support import IMPLEMENTATIONS

STEPS = 6


def _model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def _batches(n, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(4, 5, generator=g).to(dtype), torch.randn(4, 3, generator=g).to(dtype))
        for _ in range(n)
    ]


def _loss(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def _train(model, opt, batches, released: bool):
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for x, y in batches:
        opt.zero_grad()
        _loss(model, x, y).backward()
        if released:
            assert all(p.grad is None for p in model.parameters()), "gradients not freed"
        opt.step()
        sched.step()


KINDS = {
    "lion": lambda params, **kw: lionopt.Lion(params, lr=1e-2, weight_decay=0.1, **kw),
    "lion-cautious-int8": lambda params, **kw: lionopt.Lion(
        params, lr=1e-2, weight_decay=0.1, cautious=True, momentum_dtype="int8", **kw
    ),
    "lion-decoupled-bf16": lambda params, **kw: lionopt.Lion(
        params, lr=1e-2, weight_decay=0.1, decouple_lr=True, momentum_dtype="bf16", **kw
    ),
    "signum": lambda params, **kw: lionopt.Signum(params, lr=1e-2, weight_decay=0.1, **kw),
    "tiger": lambda params, **kw: lionopt.Tiger(params, lr=1e-2, weight_decay=0.1, **kw),
    "tiger-accum2": lambda params, **kw: lionopt.Tiger(
        params, lr=1e-2, weight_decay=0.1, accum_steps=2, **kw
    ),
}


def _assert_same(model, opt, ref, ref_opt):
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
        for key, value in ref_opt.state[q].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(opt.state[p][key], value), key
            else:
                assert opt.state[p][key] == value, key
    for g, h in zip(opt.param_groups, ref_opt.param_groups):
        assert {k: v for k, v in g.items() if k != "params"} == {
            k: v for k, v in h.items() if k != "params"
        }


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS), indirect=True)
def test_released_steps_equal_ordinary_steps(kind, implementation):
    batches = _batches(STEPS)
    impl = IMPLEMENTATIONS[implementation]
    model, ref = _model(), _model()
    opt = KINDS[kind](model.parameters(), step_in_backward=True, **impl)
    ref_opt = KINDS[kind](ref.parameters(), **impl)
    assert opt.step_in_backward and not ref_opt.step_in_backward
    _train(model, opt, batches, released=True)
    _train(ref, ref_opt, batches, released=False)
    assert not torch.equal(model[0].weight, _model()[0].weight)
    _assert_same(model, opt, ref, ref_opt)


def test_float64_against_lion_written_out():
    """Released Lion in float64 against the rule written out here, many steps, decay > 0."""
    lr, b1, b2, wd = 3e-3, 0.9, 0.99, 0.2
    model = _model(torch.float64)
    opt = lionopt.Lion(
        model.parameters(), lr=lr, betas=(b1, b2), weight_decay=wd, step_in_backward=True
    )
    theta = [p.detach().clone() for p in model.parameters()]
    moms = [torch.zeros_like(t) for t in theta]
    ref = _model(torch.float64)
    for x, y in _batches(20, torch.float64):
        _loss(model, x, y).backward()
        opt.step()
        with torch.no_grad():
            for p, t in zip(ref.parameters(), theta):
                p.copy_(t)
        ref.zero_grad()
        _loss(ref, x, y).backward()
        for i, p in enumerate(ref.parameters()):
            g = p.grad
            c = b1 * moms[i] + (1 - b1) * g
            theta[i] = theta[i] * (1 - lr * wd) - lr * torch.sign(c)
            moms[i] = b2 * moms[i] + (1 - b2) * g
    for p, t, m in zip(model.parameters(), theta, moms):
        torch.testing.assert_close(p.detach(), t, rtol=0, atol=1e-15)
        torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=0, atol=1e-15)


def test_resume_through_state_dict_equals_uninterrupted():
    batches = _batches(STEPS)
    model = _model()
    opt = lionopt.Lion(model.parameters(), lr=1e-2, weight_decay=0.1, step_in_backward=True)
    _train(model, opt, batches[:3], released=True)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    _train(model, opt, batches[3:], released=True)

    resumed = _model()
    resumed.load_state_dict(saved["model"])
    resumed_opt = lionopt.Lion(
        resumed.parameters(), lr=1e-2, weight_decay=0.1, step_in_backward=True
    )
    resumed_opt.load_state_dict(saved["opt"])
    _train(resumed, resumed_opt, batches[3:], released=True)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg"], resumed_opt.state[q]["exp_avg"])


@pytest.mark.parametrize("kind", ["lion", "tiger"])
def test_micro_batch_accumulation_steps_on_the_last_backward(kind):
    micro = _batches(3 * 3)
    model, ref = _model(), _model()
    opt = KINDS[kind](model.parameters(), step_in_backward=True)
    ref_opt = KINDS[kind](ref.parameters())
    for step in range(3):
        chunk = micro[3 * step : 3 * step + 3]
        with opt.accumulate_grads():
            for x, y in chunk[:-1]:
                _loss(model, x, y).backward()
        assert model[0].weight.grad is not None  # kept while accumulating
        _loss(model, *chunk[-1]).backward()  # steps on the sum of the three
        assert model[0].weight.grad is None
        opt.step()
        ref_opt.zero_grad()
        for x, y in chunk:
            _loss(ref, x, y).backward()
        ref_opt.step()
    _assert_same(model, opt, ref, ref_opt)


def test_grads_set_by_hand_are_stepped_by_step():
    model, ref = _model(), _model()
    opt = lionopt.Lion(model.parameters(), lr=1e-2, weight_decay=0.1, step_in_backward=True)
    ref_opt = lionopt.Lion(ref.parameters(), lr=1e-2, weight_decay=0.1)
    for p, q in zip(model.parameters(), ref.parameters()):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    opt.step()
    ref_opt.step()
    _assert_same(model, opt, ref, ref_opt)
    assert all(p.grad is None for p in model.parameters())


def test_closure_and_grad_scaler_are_refused():
    model = _model()
    opt = lionopt.Lion(model.parameters(), step_in_backward=True)
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: _loss(model, *_batches(1)[0]))
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(_loss(model, *_batches(1)[0])).backward()
    with pytest.raises(ValueError, match="GradScaler"), pytest.warns(FutureWarning):
        scaler.step(opt)


def test_non_leaf_and_shared_parameters_are_refused():
    leaf = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="leaf"):
        lionopt.Lion([leaf * 2], step_in_backward=True)
    model = _model()
    first = lionopt.Lion(model.parameters(), step_in_backward=True)
    with pytest.raises(ValueError, match="another optimizer"):
        lionopt.Tiger(model.parameters(), step_in_backward=True)
    with pytest.raises(ValueError, match="another optimizer"):
        lionopt.Lion([{"params": [model[2].bias]}], step_in_backward=True)
    lionopt.Lion(model.parameters())  # an ordinary optimizer beside it is fine
    first.remove_step_in_backward_hooks()
    second = lionopt.Lion(model.parameters(), step_in_backward=True)
    del second
    gc.collect()
    lionopt.Lion(model.parameters(), step_in_backward=True)  # the owner is gone


def test_duplicate_parameters_in_one_group_are_refused():
    p = nn.Parameter(torch.randn(3))
    for kind in (lionopt.Lion, lionopt.Signum, lionopt.Tiger):
        with pytest.raises(ValueError, match="twice"):
            kind([p, p])
    opt = lionopt.Lion([nn.Parameter(torch.randn(2))])
    with pytest.raises(ValueError, match="twice"):
        opt.add_param_group({"params": [p, p]})


def test_copied_and_saved_models_carry_no_ownership(tmp_path):
    model = _model()
    lionopt.Lion(model.parameters(), step_in_backward=True)
    twin = copy.deepcopy(model)
    lionopt.Lion(twin.parameters(), step_in_backward=True)  # the copy is free to release
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    lionopt.Lion(loaded.parameters(), step_in_backward=True)
