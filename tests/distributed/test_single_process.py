"""Distributed-facing properties that need no process group.

- ``torch.load(weights_only=True)`` reads a plain saved state dict of every format;
- the state holds only tensors, ints and floats;
- a zero-gradient step at lr 0 (what DCP's ``get_state_dict`` runs to create state) changes
  nothing;
- cautious Lion and Tiger refuse a group whose parameters were swapped for flat partitions
  (what DeepSpeed ZeRO does), before anything changes; Accelerate-style swaps that keep the
  shapes pass.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lionopt import Lion, Tiger

FORMATS = [
    dict(),
    dict(momentum_dtype=torch.bfloat16),
    dict(momentum_dtype="int8"),
    dict(stochastic_rounding=True),
    dict(cautious=True, decouple_lr=True),
]


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 80, dtype=dtype), nn.Linear(80, 3, dtype=dtype))


def _step(opt, model, lr=None):
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()


@pytest.mark.parametrize(
    "kwargs", FORMATS, ids=lambda k: ",".join(map(str, k.items())) or "default"
)
def test_weights_only_load_and_plain_state(kwargs):
    dtype = torch.bfloat16 if kwargs.get("stochastic_rounding") else torch.float32
    model = _model(dtype)
    opt = Lion(model.parameters(), lr=1e-3, weight_decay=0.1, **kwargs)
    _step(opt, model)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    for state in loaded["state"].values():
        for key, value in state.items():
            assert isinstance(value, (torch.Tensor, int, float)), (key, type(value))
    opt2 = Lion(_model(dtype).parameters(), lr=1e-3, weight_decay=0.1, **kwargs)
    opt2.load_state_dict(loaded)
    for key, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt2.state_dict()["state"][key][name]), name


@pytest.mark.parametrize(
    "kwargs", FORMATS, ids=lambda k: ",".join(map(str, k.items())) or "default"
)
def test_zero_grad_lr0_step_changes_nothing(kwargs):
    dtype = torch.bfloat16 if kwargs.get("stochastic_rounding") else torch.float32
    model = _model(dtype)
    opt = Lion(model.parameters(), lr=1e-3, weight_decay=0.1, **kwargs)
    _step(opt, model)
    before = [p.clone() for p in model.parameters()]
    moments = {
        k: {n: v.clone() for n, v in s.items() if n != "step"}
        for k, s in opt.state_dict()["state"].items()
    }
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for b, p in zip(before, model.parameters(), strict=True):
        assert torch.equal(b, p)
    # m ← β2·m: a zero gradient decays the momentum; DCP only runs this step on empty state,
    # where m = 0 stays 0.
    fresh = Lion(_model(dtype).parameters(), lr=1e-3, weight_decay=0.1, **kwargs)
    fresh.param_groups[0]["lr"] = 0.0  # as DCP's _init_optim_state does
    for p in fresh.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    fresh_before = [p.clone() for p in fresh.param_groups[0]["params"]]
    fresh.step()
    for b, p in zip(fresh_before, fresh.param_groups[0]["params"], strict=True):
        assert torch.equal(b, p)
    for state in fresh.state_dict()["state"].values():
        assert not torch.any(state["exp_avg"].float())
    assert moments  # the first optimizer had state


def _flatten_like_deepspeed(opt):
    group = opt.param_groups[0]
    flat = torch.cat([p.detach().reshape(-1) for p in group["params"]])[:100].clone()
    flat.grad = torch.randn_like(flat)
    group["params"] = [flat]
    return flat


@pytest.mark.parametrize("make", [lambda ps: Lion(ps, cautious=True), lambda ps: Tiger(ps)])
def test_flat_partition_is_refused(make):
    model = _model()
    opt = make(list(model.parameters()))
    flat = _flatten_like_deepspeed(opt)
    before = flat.clone()
    with pytest.raises(ValueError, match="whole parameters"):
        opt.step()
    assert torch.equal(before, flat)


def test_flat_partition_is_fine_for_plain_lion_and_shape_keeping_swaps():
    model = _model()
    opt = Lion(list(model.parameters()), lr=1e-3)
    _flatten_like_deepspeed(opt)
    opt.step()  # elementwise: exact on a partition
    model2 = _model()
    opt2 = Lion(list(model2.parameters()), lr=1e-3, cautious=True)
    swapped = [nn.Parameter(p.detach().clone()) for p in model2.parameters()]
    for p in swapped:
        p.grad = torch.randn_like(p)
    opt2.param_groups[0]["params"] = swapped  # Accelerate-style: same shapes
    opt2.step()


@pytest.mark.parametrize("kwargs", [{}, dict(fused=True), dict(momentum_dtype=torch.bfloat16)])
def test_wrapper_subclass_never_reaches_a_fused_kernel(kwargs):
    """A wrapper tensor subclass (its data_ptr() is not its data) used to crash the fused
    kernels (SIGSEGV); it goes to the foreach path, whose torch ops it dispatches itself."""
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    torch.manual_seed(0)
    a, b = torch.randn(300), torch.randn(300)
    plain = nn.Parameter(a.clone())
    wrapped = nn.Parameter(two_tensor.TwoTensor(a.clone(), b.clone()))
    opt_plain = Lion([plain], lr=0.1, weight_decay=0.1, **kwargs)
    opt = Lion([wrapped], lr=0.1, weight_decay=0.1, **kwargs)
    for step in range(3):
        ga, gb = torch.randn(300), torch.randn(300)
        plain.grad = ga.clone()
        wrapped.grad = two_tensor.TwoTensor(ga.clone(), gb)
        with pytest.warns(RuntimeWarning) if kwargs.get("fused") and step == 0 else _nothing():
            opt.step()
        opt_plain.step()
    assert torch.equal(wrapped.detach().a, plain.detach())


def test_wrapper_gradient_of_a_plain_parameter_never_reaches_a_fused_kernel():
    """Only the gradient is a wrapper subclass (its data_ptr() is 0): the default step must
    keep it away from the fused kernels (it crashed there: SIGSEGV) and step it with the
    foreach path's torch ops."""
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    torch.manual_seed(0)
    a = torch.randn(300)
    default, loop = nn.Parameter(a.clone()), nn.Parameter(a.clone())
    opt_default = Lion([default], lr=0.1, weight_decay=0.1)
    opt_loop = Lion([loop], lr=0.1, weight_decay=0.1, foreach=True)
    for _ in range(3):
        g, h = torch.randn(300), torch.randn(300)
        default.grad = two_tensor.TwoTensor(g.clone(), h.clone())
        loop.grad = two_tensor.TwoTensor(g.clone(), h.clone())
        opt_default.step()
        opt_loop.step()
    assert torch.equal(default.detach(), loop.detach())


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
