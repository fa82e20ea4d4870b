"""``lionopt.diagnostics.lion_stats``: each figure against a hand computation, one host sync."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lionopt import Lion
from lionopt.diagnostics import lion_stats
from lionopt.optim import Signum, Tiger


def lion_with_history(
    steps: int = 5, shape: tuple[int, ...] = (6, 4), **kwargs
) -> tuple[list[nn.Parameter], Lion]:
    params = [nn.Parameter(torch.randn(shape, dtype=torch.float64)) for _ in range(2)]
    opt = Lion(params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.5, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    return params, opt


def test_figures_against_hand_computation() -> None:
    params, opt = lion_with_history()
    lam = 0.5
    with torch.no_grad():
        params[0][0, 0] = 1 / lam  # one coordinate on the box
    params[1].grad[2, 1] = math.nan
    params[1].grad[3, 3] = -math.inf
    stats = lion_stats(opt)

    values = torch.cat([p.detach().flatten() for p in params])
    assert stats["group0/lr"] == 1e-2
    assert stats["group0/weight_rms"] == pytest.approx(values.pow(2).mean().sqrt().item())
    assert stats["group0/equilibrium_rms"] == pytest.approx(math.sqrt(1e-2 / (2 * lam)))
    assert stats["group0/box_max"] == pytest.approx(1.0)
    assert stats["group0/box_share"] == pytest.approx(1 / values.numel())
    agree = sum(
        int(((0.9 * opt.state[p]["exp_avg"] + 0.1 * p.grad).sign() * p.grad > 0).sum())
        for p in params
    )
    assert stats["group0/sign_agreement"] == pytest.approx(agree / values.numel())
    assert 0.3 < stats["group0/sign_agreement"] < 1.0
    assert stats["group0/nonfinite_grads"] == 2
    assert all(isinstance(v, float) for v in stats.values())


def applied_sign_agreement(params, before) -> float:
    """Share of coordinates where the applied step −Δθ agrees with the gradient (λ = 0)."""
    agree = sum(int(((b - p.detach()) * p.grad > 0).sum()) for p, b in zip(params, before))
    return agree / sum(p.numel() for p in params)


def test_before_and_after_step_measure_the_applied_update() -> None:
    params, opt = lion_with_history(shape=(64, 32))
    for group in opt.param_groups:
        group["weight_decay"] = 0.0  # so that Δθ is the sign step alone
    before_step = lion_stats(opt)["group0/sign_agreement"]
    before = [p.detach().clone() for p in params]
    opt.step()
    applied = applied_sign_agreement(params, before)
    after_step = lion_stats(opt, after_step=True)["group0/sign_agreement"]
    assert before_step == applied == after_step
    # Without after_step=True the stale figure is a different one.
    assert lion_stats(opt)["group0/sign_agreement"] != applied


def test_tiger_accumulation_and_groups() -> None:
    weight = nn.Parameter(torch.randn(8, 8, dtype=torch.float64))
    bias = nn.Parameter(torch.randn(8, dtype=torch.float64))
    opt = Tiger(
        [{"params": [weight]}, {"params": [bias], "bias_or_gain": True}],
        lr=1e-2,
        weight_decay=0.25,
        accum_steps=3,
    )
    for _ in range(2):
        for micro_step in range(3):
            for p in (weight, bias):
                p.grad = torch.randn_like(p)
            stats = lion_stats(opt)
            before = weight.detach().clone()
            opt.step()
            if micro_step == 2:  # the update micro-step: before == applied == after
                applied = applied_sign_agreement([weight], [before])
                # λ > 0 here: compare signs of the step without the decay term.
                assert stats["group0/sign_agreement"] == pytest.approx(applied, abs=0.05)
                after = lion_stats(opt, after_step=True)["group0/sign_agreement"]
                m = opt.state[weight]["exp_avg"]
                exact = float((m.sign() * weight.grad > 0).double().mean())
                assert after == exact
                assert stats["group0/sign_agreement"] == exact
    assert stats["group0/equilibrium_rms"] == pytest.approx(1e-2 / (2 * 0.25))
    assert stats["group1/equilibrium_rms"] == math.inf
    assert stats["group1/box_max"] == 0.0 and stats["group1/box_share"] == 0.0


def test_decouple_lr_uses_the_effective_decay() -> None:
    p = nn.Parameter(torch.full((4,), 2.0))
    opt = Lion([p], lr=1e-3, weight_decay=0.1, decouple_lr=True, max_lr=2e-3)
    stats = lion_stats(opt)
    lam = 0.1 / 2e-3
    assert stats["group0/box_max"] == pytest.approx(2.0 * lam)
    assert stats["group0/equilibrium_rms"] == pytest.approx(math.sqrt(1e-3 / (2 * lam)))
    assert math.isnan(stats["group0/sign_agreement"])  # no gradients yet


def test_one_host_sync_and_no_side_effects(monkeypatch) -> None:
    params, opt = lion_with_history()
    opt.add_param_group({"params": [nn.Parameter(torch.randn(3, dtype=torch.float64))]})
    snapshot = [p.detach().clone() for p in params] + [
        opt.state[p]["exp_avg"].clone() for p in params
    ]
    calls = []
    for name in ("tolist", "item", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name):
            calls.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counting)
    stats = lion_stats(opt)
    monkeypatch.undo()
    assert calls == ["tolist"]
    assert "group1/weight_rms" in stats
    after = [p.detach() for p in params] + [opt.state[p]["exp_avg"] for p in params]
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after))


def test_signum_works_and_other_optimizers_are_refused() -> None:
    p = nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    assert "group0/sign_agreement" in lion_stats(Signum([p], lr=1e-3))
    with pytest.raises(TypeError):
        lion_stats(torch.optim.AdamW([p]))
