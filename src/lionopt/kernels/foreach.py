"""The multi-tensor Lion step: the reference math with ``torch._foreach_*`` ops.

Same operation order as ``reference``, so it is bitwise equal to it in every dtype. It
allocates one update-sized temporary per tensor; the fused kernels avoid that.
``lr`` may be a 0-dim Tensor here (the path ``torch.compile`` traces).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lionopt.kernels.group import TensorGroup
from lionopt.kernels.hyper import LionHyper, cautious_scale, is_low_precision
from lionopt.kernels.rounding import store_params
from lionopt.state.int8 import BLOCK, dequantize, quantize_into

__all__ = ["multi_tensor", "multi_tensor_lion", "quantized_lion_foreach"]


def multi_tensor(group: TensorGroup, hyper: LionHyper) -> None:
    """The multi-tensor body of ``functional.lion``: one group, plain or 8-bit momentum."""
    if group.scales is None:
        multi_tensor_lion(group.params, group.grads, group.momenta, hyper, stats=group.stats)
    else:
        quantized_lion_foreach(
            group.params, group.grads, group.momenta, group.scales, hyper, stats=group.stats
        )


def quantized_lion_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    codes: list[Tensor],
    scales: list[Tensor],
    hyper: LionHyper,
    *,
    stats=None,
) -> None:
    """8-bit momentum, the whole group at once: one dequantise, the foreach step, one quantise."""
    values = dequantize(torch.cat(codes), torch.cat(scales))
    pieces = values.split([code.numel() for code in codes])
    moments = [piece[: p.numel()].view(p.shape) for piece, p in zip(pieces, params)]
    multi_tensor_lion(params, grads, moments, hyper, stats=stats)
    all_codes = torch.empty(values.numel(), dtype=torch.int8, device=values.device)
    all_scales = torch.empty(values.numel() // BLOCK, dtype=torch.float32, device=values.device)
    quantize_into(values, all_codes, all_scales)
    torch._foreach_copy_(codes, list(all_codes.split([c.numel() for c in codes])))
    torch._foreach_copy_(scales, list(all_scales.split([s.numel() for s in scales])))


def multi_tensor_lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hyper: LionHyper,
    *,
    stats=None,
) -> None:
    """The reference step with ``torch._foreach_*`` ops (``stats``: see ``kernels.group``)."""
    if not params:
        return
    if torch.is_complex(params[0]):
        params, grads, exp_avgs = (
            [torch.view_as_real(t) for t in tensors] for tensors in (params, grads, exp_avgs)
        )
    if hyper.maximize:
        grads = torch._foreach_neg(grads)

    low_precision = is_low_precision(params[0]) or is_low_precision(exp_avgs[0])
    if low_precision:
        thetas = [p.float() for p in params]
        moms = [m.float() for m in exp_avgs]
        grads = [g.float() for g in grads]
    else:
        thetas, moms = params, exp_avgs
        grads = [g.to(p.dtype) for p, g in zip(params, grads)]

    directions = list(torch._foreach_mul(moms, hyper.beta1))
    torch._foreach_add_(directions, torch._foreach_mul(grads, 1 - hyper.beta1))
    torch._foreach_sign_(directions)
    updates = directions
    if hyper.cautious:
        updates = []
        for i, (direction, grad) in enumerate(zip(directions, grads)):
            agree = (direction * grad > 0).to(direction.dtype)
            directions[i] = direction * agree
            updates.append(directions[i] * cautious_scale(agree, stats))

    lr = hyper.lr if isinstance(hyper.lr, Tensor) else hyper.uniform_lr
    if hyper.weight_decay != 0:
        _apply_decay(thetas, directions, hyper, lr)
    if isinstance(lr, float):
        torch._foreach_add_(thetas, updates, alpha=-lr)
    else:
        neg_lrs = -lr if isinstance(lr, Tensor) else [-x for x in hyper.lrs(len(thetas))]
        torch._foreach_add_(thetas, torch._foreach_mul(updates, neg_lrs))

    torch._foreach_mul_(moms, hyper.beta2)
    torch._foreach_add_(moms, grads, alpha=1 - hyper.beta2)

    if low_precision:
        store_params(params, thetas, hyper.rounding_keys)
        torch._foreach_copy_(exp_avgs, moms)


def _apply_decay(
    thetas: list[Tensor], directions: list[Tensor], hyper: LionHyper, lr: float | Tensor | None
) -> None:
    if lr is None:
        decays = [1 - x * hyper.weight_decay for x in hyper.lrs(len(thetas))]
    else:
        decays = 1 - lr * hyper.weight_decay
    if not hyper.cautious_weight_decay:
        torch._foreach_mul_(thetas, decays)
        return
    decayed = torch._foreach_mul(thetas, decays)
    for theta, theta_decayed, direction in zip(thetas, decayed, directions):
        decays_here = direction * theta >= 0  # arXiv 2510.12402: I(u·θ ≥ 0)
        theta.copy_(torch.where(decays_here, theta_decayed, theta))
