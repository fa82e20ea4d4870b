"""timm's optimizer factory builds lionopt's optimizers after
``lionopt.integrations.timm.register()``, with timm's parameter groups, and a run saved with
``torch.save`` and resumed equals the uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lionopt
from lionopt.integrations import timm as timm_integration

from frameworks import require

timm_optim = require("timm.optim", "create_optimizer_v2")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.LayerNorm(10), nn.ReLU(), nn.Linear(10, 3))


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _batches(n):
    g = torch.Generator().manual_seed(4)
    return [
        (torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)
    ]


def test_register_names_and_classes():
    names = timm_integration.register()
    assert set(names) <= set(timm_optim.list_optimizers())
    model = _model()
    assert type(timm_optim.create_optimizer_v2(model, "lionopt", lr=1e-3)) is lionopt.Lion
    cautious = timm_optim.create_optimizer_v2(model, "clionopt", lr=1e-3)
    assert cautious.param_groups[0]["cautious"] is True
    assert type(timm_optim.create_optimizer_v2(model, "signumopt", lr=1e-3)) is lionopt.Signum
    assert type(timm_optim.create_optimizer_v2(model, "tigeropt", lr=1e-3)) is lionopt.Tiger
    # timm's own Lion is untouched
    assert timm_optim.get_optimizer_class("lion") is not lionopt.Lion


def test_create_optimizer_v2_steps_like_lion_with_timms_groups(tmp_path):
    timm_integration.register()
    batches = _batches(8)
    model = _model()
    opt = timm_optim.create_optimizer_v2(
        model, "lionopt", lr=1e-3, weight_decay=0.2, betas=(0.95, 0.98), eps=1e-8
    )
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 0.2]  # biases and norm gains get no decay (timm's groups)
    _train(model, opt, batches[:4])
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(model, opt, batches[4:])

    # The same groups built by hand, on the reference loop.
    ref = _model()
    no_decay = [p for p in ref.parameters() if p.ndim <= 1]
    decay = [p for p in ref.parameters() if p.ndim > 1]
    ref_opt = lionopt.Lion(
        [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.2}],
        lr=1e-3,
        betas=(0.95, 0.98),
        foreach=False,
        fused=False,
    )
    _train(ref, ref_opt, batches)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)

    resumed = _model()
    resumed_opt = timm_optim.create_optimizer_v2(
        resumed, "lionopt", lr=1e-3, weight_decay=0.2, betas=(0.95, 0.98)
    )
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt.load_state_dict(ckpt["opt"])
    _train(resumed, resumed_opt, batches[4:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg"], resumed_opt.state[q]["exp_avg"])
