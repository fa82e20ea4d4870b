"""``torch.amp.GradScaler("cpu")`` + bf16 autocast with lionopt.Lion.

Scaling the loss by a power of two scales every gradient exactly, and unscaling undoes it
exactly, so a scaled run must equal the unscaled run bitwise; a step with an inf gradient must
be skipped (weights and momenta untouched) and the scale halved; a run resumed from the
optimizer's and the scaler's state dicts must equal the uninterrupted one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lionopt

from support import IMPLEMENTATIONS


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _batches(n):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)) for _ in range(n)]


def _loss(model, x, y):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    return nn.functional.mse_loss(out.float(), y)


def _train(model, opt, scaler, batches, poison=()):
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        loss = _loss(model, x, y)
        if scaler is None:
            loss.backward()
            opt.step()
            continue
        scaler.scale(loss).backward()
        if i in poison:
            next(model.parameters()).grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS), indirect=True)
def test_gradscaler_bf16_autocast_equals_unscaled_and_resumes(implementation, tmp_path):
    kwargs = dict(lr=1e-3, weight_decay=0.1, **IMPLEMENTATIONS[implementation])
    batches = _batches(8)
    plain = _model()
    plain_opt = lionopt.Lion(plain.parameters(), **kwargs)
    _train(plain, plain_opt, None, batches)

    scaled = _model()
    opt = lionopt.Lion(scaled.parameters(), **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    _train(scaled, opt, scaler, batches[:4])
    state = {"model": scaled.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict()}
    torch.save(state, tmp_path / "c.pt")
    _train(scaled, opt, scaler, batches[4:])
    assert scaler.get_scale() == 2.0**12  # grew twice, every 3 finite steps
    for p, q in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(plain_opt.state[p]["exp_avg"], opt.state[q]["exp_avg"])

    resumed = _model()
    resumed_opt = lionopt.Lion(resumed.parameters(), **kwargs)
    resumed_scaler = torch.amp.GradScaler("cpu")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt.load_state_dict(ckpt["opt"])
    resumed_scaler.load_state_dict(ckpt["scaler"])
    _train(resumed, resumed_opt, resumed_scaler, batches[4:])
    assert resumed_scaler.get_scale() == scaler.get_scale()
    for p, q in zip(scaled.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg"], resumed_opt.state[q]["exp_avg"])


def test_gradscaler_skips_a_step_with_an_inf_gradient():
    batches = _batches(3)
    model = _model()
    opt = lionopt.Lion(model.parameters(), lr=1e-3, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _train(model, opt, scaler, batches[:1])
    before = [p.detach().clone() for p in model.parameters()]
    momenta = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    _train(model, opt, scaler, batches[1:2], poison=(0,))
    assert scaler.get_scale() == 2.0**9
    for p, b, m in zip(model.parameters(), before, momenta):
        assert torch.equal(p, b)
        assert torch.equal(opt.state[p]["exp_avg"], m)
    _train(model, opt, scaler, batches[2:])
    assert not torch.equal(next(model.parameters()), before[0])
