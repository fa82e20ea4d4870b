"""Checkpoints move between lionopt and the common PyTorch Lion ports, when they are installed.

Each direction trains 8 steps with one optimizer, moves the state dict to the other, trains 8
more, and compares with 16 uninterrupted steps. Peers round ``c`` slightly differently (fused
multiply-add, lerp), so the comparison allows a few ULP; a lost momentum moves weights by ~lr.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lionopt import Lion

LR, WD = 1e-2, 0.3


def peer_factory(name: str):
    if name == "lion_pytorch":
        module = pytest.importorskip("lion_pytorch")
        return lambda params: module.Lion(params, lr=LR, weight_decay=WD)
    if name == "pytorch_optimizer":
        module = pytest.importorskip("pytorch_optimizer")

        def factory(params):
            opt = module.Lion(params, lr=LR, weight_decay=WD, foreach=False)
            opt.needs_own_groups = True
            return opt

        return factory
    raise AssertionError(name)


def ours(params):
    return Lion(params, lr=LR, weight_decay=WD)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def data(count: int = 16):
    gen = torch.Generator().manual_seed(4)
    return [
        (torch.randn(32, 6, generator=gen), torch.randn(32, 3, generator=gen)) for _ in range(count)
    ]


def train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def resume(first_factory, second_factory, *, load_state: bool = True) -> nn.Module:
    batches = data()
    model = make_model()
    first = first_factory(model.parameters())
    train(model, first, batches[:8])
    second = second_factory(model.parameters())
    if load_state:
        state_dict = copy.deepcopy(first.state_dict())
        if getattr(second, "needs_own_groups", False):
            # pytorch-optimizer reads keys of its own from every group: keep its groups and
            # take only the per-parameter state (the workaround the README gives).
            state_dict = {**second.state_dict(), "state": state_dict["state"]}
        second.load_state_dict(state_dict)
    train(model, second, batches[8:])
    return model


def uninterrupted(factory) -> nn.Module:
    model = make_model()
    train(model, factory(model.parameters()), data())
    return model


def assert_close_models(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("peer", ["lion_pytorch", "pytorch_optimizer"])
@pytest.mark.parametrize("direction", ["peer_to_lionopt", "lionopt_to_peer"])
def test_state_dict_moves_between_peer_and_lionopt(peer, direction):
    factory = peer_factory(peer)
    if direction == "peer_to_lionopt":
        resumed, expected = resume(factory, ours), uninterrupted(factory)
        dropped = resume(factory, ours, load_state=False)
    else:
        resumed, expected = resume(ours, factory), uninterrupted(ours)
        dropped = resume(ours, factory, load_state=False)
    assert_close_models(resumed, expected)
    # The control: without the momentum the run really ends elsewhere.
    assert (
        max((p - q).abs().max().item() for p, q in zip(dropped.parameters(), expected.parameters()))
        > 1e-3
    )
