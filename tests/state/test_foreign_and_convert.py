"""A foreign optimizer's state dict is refused before anything changes; AdamW → Lion is an
explicit conversion (``lionopt.convert.adamw_to_lion``) that continues the run."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lionopt
from lionopt.convert import adamw_to_lion


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def _batches(n):
    g = torch.Generator().manual_seed(8)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)) for _ in range(n)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _snapshot(opt):
    return copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: torch.optim.AdamW(p, lr=1e-3), "eps"),
        (lambda p: torch.optim.Adam(p, lr=1e-3), "eps"),
        (lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9), "momentum"),
        (lambda p: torch.optim.RMSprop(p, lr=1e-3), "alpha"),
    ],
    ids=["adamw", "adam", "sgd", "rmsprop"],
)
@pytest.mark.parametrize("kind", [lionopt.Lion, lionopt.Signum, lionopt.Tiger])
def test_foreign_state_dict_is_refused_and_changes_nothing(make, match, kind):
    source_model = _model()
    foreign = make(source_model.parameters())
    _train(source_model, foreign, _batches(2))
    model = _model()
    opt = kind(model.parameters(), lr=1e-3)
    _train(model, opt, _batches(2))
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(foreign.state_dict())
    after = _snapshot(opt)
    assert after["param_groups"] == before["param_groups"]
    for key, state in before["state"].items():
        assert torch.equal(after["state"][key]["exp_avg"], state["exp_avg"])


def test_state_with_exp_avg_sq_or_without_exp_avg_is_refused():
    model = _model()
    opt = lionopt.Lion(model.parameters(), lr=1e-3)
    _train(model, opt, _batches(1))
    sd = _snapshot(opt)
    sd["state"][0]["exp_avg_sq"] = torch.zeros_like(sd["state"][0]["exp_avg"])
    with pytest.raises(ValueError, match="exp_avg_sq"):
        opt.load_state_dict(sd)
    sd = _snapshot(opt)
    sd["state"][1] = {"step": torch.tensor(3.0)}
    with pytest.raises(ValueError, match="no 'exp_avg'"):
        opt.load_state_dict(sd)
    opt.load_state_dict(_snapshot(opt))  # its own state dict still loads


def test_adamw_to_lion_continues_with_adamw_momentum_and_translated_hparams():
    batches = _batches(8)
    model = _model()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-3,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(adamw, lambda s: 1.0 / (1 + s))
    for x, y in batches[:4]:
        adamw.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        adamw.step()
        sched.step()
    moments = [adamw.state[p]["exp_avg"].clone() for p in model.parameters()]

    lion = lionopt.Lion([{"params": decay}, {"params": no_decay}], lr=1.0, betas=(0.95, 0.98))
    adamw_to_lion(adamw, lion)
    for group, old in zip(lion.param_groups, adamw.param_groups):
        assert group["lr"] == pytest.approx(old["lr"] / 3)
        assert group["weight_decay"] == pytest.approx(old["weight_decay"] * 3)
        assert group["initial_lr"] == pytest.approx(3e-3 / 3)
        assert group["betas"] == (0.95, 0.98)  # Lion's own
    for p, m in zip(model.parameters(), moments):
        assert torch.equal(lion.state[p]["exp_avg"], m)
        assert set(lion.state[p]) == {"exp_avg"}

    # The continued run equals Lion written out from AdamW's momentum.
    ref = [p.detach().clone() for p in model.parameters()]
    ref_m = [m.clone() for m in moments]
    wds = [0.3 if p.ndim > 1 else 0.0 for p in model.parameters()]
    lr = lion.param_groups[0]["lr"]
    for x, y in batches[4:]:
        lion.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        lion.step()
        for i, g in enumerate(grads):
            c = 0.95 * ref_m[i] + 0.05 * g
            ref[i] = ref[i] * (1 - lr * wds[i]) - lr * torch.sign(c)
            ref_m[i] = 0.98 * ref_m[i] + 0.02 * g
    for p, r, m in zip(model.parameters(), ref, ref_m):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-6)
        torch.testing.assert_close(lion.state[p]["exp_avg"], m, rtol=1e-6, atol=1e-7)


def test_adamw_to_lion_with_explicit_hparams_and_mismatched_groups():
    model = _model()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    _train(model, adamw, _batches(2))
    lion = lionopt.Lion(model.parameters())
    adamw_to_lion(adamw.state_dict(), lion, hparams={"lr": 2e-4, "weight_decay": 0.05})
    assert lion.param_groups[0]["lr"] == 2e-4 and lion.param_groups[0]["weight_decay"] == 0.05
    other = lionopt.Lion(list(model.parameters())[:2])
    before = _snapshot(other)
    with pytest.raises(ValueError, match="groups do not match"):
        adamw_to_lion(adamw, other)
    assert _snapshot(other)["param_groups"] == before["param_groups"]
