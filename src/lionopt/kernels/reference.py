"""The per-tensor reference loop: Lion written out the way the official code does it.

Every other implementation is tested against this one. The operation order (and so the
rounding in fp32) is the official one:

    c = m * beta1 + g * (1 - beta1)
    p = p * (1 - lr * weight_decay)
    p = p + (-lr) * sign(c)
    m = m * beta2 + (1 - beta2) * g

``torch.sign`` maps NaN to 0, so a NaN gradient leaves that coordinate of the parameter where
decay puts it and makes its momentum NaN, exactly as the official code does.
Low-precision parameters (bf16, fp16) are updated with fp32 math and rounded once at the end
(to nearest, or stochastically for bf16 when ``hyper.rounding_keys`` is set).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lionopt.kernels.group import TensorGroup
from lionopt.kernels.hyper import LionHyper, cautious_scale, is_low_precision
from lionopt.kernels.rounding import store_param
from lionopt.state.int8 import dequantize, quantize_into

__all__ = ["quantized_lion_loop", "single_tensor", "single_tensor_lion"]


def single_tensor(group: TensorGroup, hyper: LionHyper) -> None:
    """The single-tensor body of ``functional.lion``: one group, plain or 8-bit momentum."""
    if group.scales is None:
        single_tensor_lion(group.params, group.grads, group.momenta, hyper, stats=group.stats)
    else:
        quantized_lion_loop(
            group.params, group.grads, group.momenta, group.scales, hyper, stats=group.stats
        )


def single_tensor_lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hyper: LionHyper,
    *,
    stats=None,
) -> None:
    """The reference step, one tensor at a time (``stats``: see ``kernels.group``)."""
    count = len(params)
    for param, grad, exp_avg, lr, key in zip(
        params, grads, exp_avgs, hyper.lrs(count), hyper.keys(count)
    ):
        _lion_one(param, grad, exp_avg, lr, hyper, key, stats)


def quantized_lion_loop(
    params: list[Tensor],
    grads: list[Tensor],
    codes: list[Tensor],
    scales: list[Tensor],
    hyper: LionHyper,
    *,
    stats=None,
) -> None:
    """8-bit momentum, one tensor at a time: dequantise, the reference step in fp32, requantise."""
    count = len(params)
    for i, (param, code, scale) in enumerate(zip(params, codes, scales)):
        values = dequantize(code, scale)
        moment = values[: param.numel()].view(param.shape)
        single_tensor_lion([param], [grads[i]], [moment], hyper.one(i, count), stats=stats)
        quantize_into(values, code, scale)


def _lion_one(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    lr: float,
    hyper: LionHyper,
    key: int | None = None,
    stats=None,
) -> None:
    if torch.is_complex(param):
        param, grad, exp_avg = (torch.view_as_real(t) for t in (param, grad, exp_avg))
    if hyper.maximize:
        grad = -grad

    low_precision = is_low_precision(param) or is_low_precision(exp_avg)
    if low_precision:
        theta, m, g = param.float(), exp_avg.float(), grad.float()
    else:
        theta, m, g = param, exp_avg, grad.to(param.dtype)

    direction = torch.sign(m * hyper.beta1 + g * (1 - hyper.beta1))
    update = direction
    if hyper.cautious:
        agree = (direction * g > 0).to(direction.dtype)
        direction = direction * agree
        update = direction * cautious_scale(agree, stats)
    if hyper.weight_decay != 0:
        decay = 1 - lr * hyper.weight_decay
        if hyper.cautious_weight_decay:
            decays_here = direction * theta >= 0  # arXiv 2510.12402: I(u·θ ≥ 0)
            theta.copy_(torch.where(decays_here, theta * decay, theta))
        else:
            theta.mul_(decay)
    theta.add_(update, alpha=-lr)
    m.mul_(hyper.beta2).add_(g, alpha=1 - hyper.beta2)

    if low_precision:
        store_param(param, theta, key)
        exp_avg.copy_(m)
