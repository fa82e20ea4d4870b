"""The documented seams: the registry's selection rules, ``functional.group_tensors`` (where
lists become groups), ``TensorGroup.stats`` / ``functional.stats_for`` (whole-tensor figures)
and ``LionFamily._step_group(group, params)`` (stepping some parameters of a group)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lionopt import Lion, Tiger, functional
from lionopt.kernels import registry
from lionopt.kernels.foreach import multi_tensor_lion
from lionopt.kernels.group import LocalStats, TensorGroup
from lionopt.kernels.hyper import LionHyper
from lionopt.state.formats import PLAIN_KIND

HYPER = LionHyper(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.5)


def _backend(name, *, available=True, supports=True, rounding=False, secondary=False, log=None):
    def step(group, hyper):
        log.append(name)

    return registry.Backend(
        name=name,
        device="cpu",
        formats=frozenset({PLAIN_KIND}),
        rounding=rounding,
        available=lambda: available,
        supports=lambda group, hyper: supports,
        step=step,
        secondary=secondary,
    )


def _group(dtype=torch.float32) -> TensorGroup:
    p = torch.zeros(4, dtype=dtype)
    return TensorGroup([p], [p.clone()], [p.clone()], PLAIN_KIND, None, [0])


def test_select_order_rounding_and_secondary(monkeypatch) -> None:
    log: list[str] = []
    first = _backend("first", supports=False, log=log)
    extra = _backend("extra", rounding=True, secondary=True, log=log)
    monkeypatch.setattr(registry, "_BACKENDS", [first, extra])
    assert registry.select(_group(), HYPER) is extra  # the first declined: the secondary takes it
    monkeypatch.setattr(registry, "_BACKENDS", [_backend("gone", available=False), extra])
    assert registry.select(_group(), HYPER) is None  # nothing available declined it
    keys = LionHyper(**{**HYPER.__dict__, "rounding_keys": [1]})
    plain = _backend("plain", log=log)
    monkeypatch.setattr(registry, "_BACKENDS", [plain, extra])
    assert (
        registry.select(_group(torch.bfloat16), keys) is extra
    )  # rounding: rounding backends only
    assert registry.select(_group(torch.float32), keys) is plain  # fp32 weights are not rounded


def test_explicit_fused_warns_once_when_no_backend_takes_the_group(monkeypatch) -> None:
    monkeypatch.setattr(registry, "_BACKENDS", [_backend("no", supports=False)])
    registry._warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert registry.select(_group(), HYPER, explicit=True) is None
    assert len(caught) == 1 and "not supported" in str(caught[0].message)


def test_group_tensors_can_route_a_group_away_from_the_fused_kernels(monkeypatch) -> None:
    original = functional.group_tensors
    selected = []
    monkeypatch.setattr(registry, "select", lambda *a, **k: selected.append(1))

    def unfusable(*args):
        groups = original(*args)
        for group in groups:
            group.fusable = False
        return groups

    monkeypatch.setattr(functional, "group_tensors", unfusable)
    params = [torch.randn(5, 3), torch.randn(7)]
    grads = [torch.randn_like(p) for p in params]
    moms = [torch.randn_like(p) for p in params]
    expected = [p.clone() for p in params]
    expected_moms = [m.clone() for m in moms]
    functional.lion(params, grads, moms, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.5)
    multi_tensor_lion(expected, grads, expected_moms, HYPER)
    assert not selected
    assert all(torch.equal(a, b) for a, b in zip(params, expected))


class _CountingStats(LocalStats):
    """Same figures as ``LocalStats``, counted; ``local = False`` as a mesh-reducing one is."""

    local = False

    def __init__(self) -> None:
        self.calls: list[str] = []

    def mean(self, tensor):
        self.calls.append("mean")
        return super().mean(tensor)

    def norms(self, tensors, ord, dtype=None):
        self.calls.append(f"norms{ord}")
        return super().norms(tensors, ord, dtype)


@pytest.mark.parametrize("foreach", [False, True, None])
def test_cautious_lion_takes_its_mask_mean_from_the_group_stats(monkeypatch, foreach) -> None:
    stats = _CountingStats()
    monkeypatch.setattr(functional, "stats_for", lambda params: stats)
    steps = []
    monkeypatch.setattr(
        registry, "select", lambda *a, **k: steps.append(1)
    )  # must not be asked: non-local stats keep cautious groups off the fused kernels
    params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(9))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = Lion(params, lr=1e-2, weight_decay=0.5, cautious=True, foreach=foreach, fused=None)
    ref = Lion(twins, lr=1e-2, weight_decay=0.5, cautious=True, foreach=True)
    monkeypatch.undo()
    for _ in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        monkeypatch.setattr(functional, "stats_for", lambda params: stats)
        monkeypatch.setattr(registry, "select", lambda *a, **k: steps.append(1))
        opt.step()
        monkeypatch.undo()
        ref.step()
    assert stats.calls.count("mean") == 3 * len(params)
    assert not steps
    assert all(torch.equal(p, q) for p, q in zip(params, twins))


def test_tiger_takes_its_rms_and_guard_from_stats_for(monkeypatch) -> None:
    stats = _CountingStats()
    monkeypatch.setattr(functional, "stats_for", lambda params: stats)
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = Tiger([p], lr=1e-2)
    p.grad = torch.randn_like(p)
    opt.step()
    assert stats.calls[:2] == ["norms" + str(float("inf")), "norms2"]


def test_step_group_with_params_steps_only_those() -> None:
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    twin = torch.nn.Parameter(a.detach().clone())
    opt = Lion([a, b], lr=1e-2, weight_decay=0.5)
    ref = Lion([twin], lr=1e-2, weight_decay=0.5)
    b_before = b.detach().clone()
    for _ in range(3):
        a.grad, b.grad = torch.randn(4), torch.randn(4)
        twin.grad = a.grad.clone()
        with torch.no_grad():
            opt._step_group(opt.param_groups[0], [a])
        ref.step()
    assert torch.equal(a, twin) and torch.equal(b, b_before)
    assert b not in opt.state or "exp_avg" not in opt.state[b]
