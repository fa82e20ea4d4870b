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

from lionopt.kernels._common import LionHyper, cautious_scale, is_low_precision
from lionopt.kernels.rounding import store_param


def single_tensor_lion(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], hyper: LionHyper
) -> None:
    count = len(params)
    for param, grad, exp_avg, lr, key in zip(
        params, grads, exp_avgs, hyper.lrs(count), hyper.keys(count)
    ):
        _lion_one(param, grad, exp_avg, lr, hyper, key)


def _lion_one(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    lr: float,
    hyper: LionHyper,
    key: int | None = None,
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
        update = direction * cautious_scale(agree)
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
