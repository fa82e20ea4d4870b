"""Lion on DTensor parameters (FSDP2 ``fully_shard``, HSDP, tensor parallel): local shards.

FSDP2 makes every parameter, gradient and optimizer state a ``DTensor``; its ``to_local()`` is a
plain tensor that shares the shard's storage. Lion's update is elementwise, so the step runs
every implementation (fused C++, Triton, foreach, loop, 8-bit) on the local shards and equals
the unsharded step exactly. What the rule takes over a whole tensor is reduced over the mesh:

- cautious' mask mean: the mask count of each shard, summed over the mesh (one all-reduce for
  the group); the count is an exact integer, so the result equals the unsharded run bitwise;
- Tiger's RMS and its non-finite check: ``tensor_norms`` (local norms, one all-reduce per mesh
  dimension for the whole group; the RMS may differ from the unsharded one in the last bit);
- stochastic rounding: the random bits of an element are drawn from its global index, so a
  sharded run rounds exactly as the unsharded one.

State is created on the local shard and kept as a DTensor with the parameter's mesh and
placements, so ``torch.distributed.checkpoint`` reshards it. 8-bit momentum is quantised per
local shard (blocks of 256 elements of the shard), which does not reshard by itself: the
optimizer's ``state_dict()`` presents it as an fp32 DTensor shaped like the parameter
(``present_state``), and ``load_state_dict`` re-quantises it on the new shards
(``requantize_loaded``). Whether a parameter is quantised is decided on its global numel, so
the format does not depend on the world size.

``check_group`` raises ValueError, before anything is changed, for what the local step cannot
handle: a gradient or momentum whose mesh or placements differ from its parameter's, a
``Partial`` placement, or a DTensor gradient of a plain parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lionopt.kernels._common import CAUTIOUS_MEAN_FLOOR, LionHyper, is_low_precision
from lionopt.kernels.quantized import (
    INT8,
    dequantize,
    quantize,
    quantize_into,
    quantizes,
)
from lionopt.kernels.quantized import (
    convert_momentum as convert_plain_momentum,
)
from lionopt.kernels.rounding import stochastic_round_bf16

try:  # torch.distributed is optional in some torch builds
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Partial, Shard
except ImportError:  # pragma: no cover - builds without distributed support
    dist = None
    DTensor = None

__all__ = [
    "any_dtensor",
    "check_group",
    "convert_momentum",
    "global_index",
    "is_dtensor",
    "local",
    "present_state",
    "requantize_loaded",
    "sharded_lion",
    "tensor_norms",
]


def is_dtensor(tensor: object) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def any_dtensor(*lists: Sequence[Tensor]) -> bool:
    """Whether any tensor in ``lists`` is a DTensor."""
    if DTensor is None:
        return False
    return any(isinstance(t, DTensor) for tensors in lists for t in tensors)


def local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (a plain tensor sharing its storage); other tensors as is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def _describe(tensor: Tensor) -> str:
    if is_dtensor(tensor):
        return f"a DTensor with placements {tuple(tensor.placements)} on {tensor.device_mesh}"
    return f"a plain {type(tensor).__name__} of shape {tuple(tensor.shape)}"


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return a.device_mesh == b.device_mesh and tuple(a.placements) == tuple(b.placements)


def check_group(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_scales: Sequence[Tensor | None] | None = None,
    *,
    rounding: bool = False,
) -> None:
    """ValueError for a tensor the local-shard step cannot take; checks everything first."""
    for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs, strict=True)):
        quantized = exp_avg_scales is not None and exp_avg_scales[i] is not None
        if not is_dtensor(p):
            if is_dtensor(g) or is_dtensor(m):
                raise ValueError(
                    f"parameter {i} is a plain tensor but its gradient is {_describe(g)} and "
                    f"its momentum {_describe(m)}: use DTensors for all three or for none"
                )
            continue
        for placement in p.placements:
            if isinstance(placement, Partial):
                raise ValueError(
                    f"parameter {i} has a Partial placement ({tuple(p.placements)}): its local "
                    "values are not the parameter's values; redistribute it to Shard or Replicate"
                )
            if rounding and isinstance(placement, Shard) and type(placement) is not Shard:
                raise ValueError(
                    f"parameter {i} has placement {placement}: stochastic rounding needs each "
                    "element's global index, which is implemented for Shard and Replicate only"
                )
        if not is_dtensor(g) or not _same_layout(p, g):
            raise ValueError(
                f"parameter {i} is {_describe(p)}, its gradient {_describe(g)}: the step runs "
                "on local shards, so the gradient needs the parameter's mesh and placements"
            )
        if quantized:
            if is_dtensor(m):
                raise ValueError(f"parameter {i}: 8-bit momentum codes must be the local shard's")
        elif not is_dtensor(m) or not _same_layout(p, m):
            raise ValueError(
                f"parameter {i} is {_describe(p)}, its momentum {_describe(m)}: the momentum "
                "needs the parameter's mesh and placements (load checkpoints of sharded models "
                "with torch.distributed.checkpoint)"
            )


def sharded_lion(
    step: Callable[..., None],
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    hyper: LionHyper,
    foreach: bool | None,
    fused: bool | None,
    exp_avg_scales: Sequence[Tensor | None] | None,
    rounding_keys: Sequence[int] | None,
) -> None:
    """One Lion step over a list holding DTensors; ``step`` is ``functional.lion``.

    The local shards go to ``step`` (so the default path is the fused kernel). Stochastically
    rounded bf16 parameters are stepped in an fp32 copy and rounded here with global element
    indices; cautious Lion runs here on the local shards, with mask means reduced over the mesh.
    """
    keys = None if rounding_keys is None else list(rounding_keys)
    check_group(params, grads, exp_avgs, exp_avg_scales, rounding=keys is not None)
    rounds = [keys is not None and p.dtype == torch.bfloat16 for p in params]
    # An fp32 copy for each rounded parameter: the step's math is fp32 anyway, and the one
    # rounding at the end needs the global index of every element.
    targets = [local(p).float() if r else local(p) for p, r in zip(params, rounds, strict=True)]
    if hyper.cautious:
        _cautious_step(
            targets,
            [local(g) for g in grads],
            [local(m) for m in exp_avgs],
            params,
            exp_avg_scales,
            hyper,
        )
    else:
        step(
            targets,
            [local(g) for g in grads],
            [local(m) for m in exp_avgs],
            lr=list(hyper.lr) if not isinstance(hyper.lr, (int, float)) else hyper.lr,
            beta1=hyper.beta1,
            beta2=hyper.beta2,
            weight_decay=hyper.weight_decay,
            maximize=hyper.maximize,
            foreach=foreach,
            fused=fused,
            cautious_weight_decay=hyper.cautious_weight_decay,
            exp_avg_scales=exp_avg_scales,
        )
    for i, (p, target) in enumerate(zip(params, targets, strict=True)):
        if rounds[i]:
            local(p).copy_(stochastic_round_bf16(target, keys[i], global_index(p)))


def _like(param: Tensor, shard: Tensor) -> Tensor:
    """``shard`` as a DTensor laid out like ``param`` (sharing storage); plain as is."""
    if not is_dtensor(param):
        return shard
    return DTensor.from_local(
        shard,
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


def _cautious_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    layouts: list[Tensor],
    exp_avg_scales: Sequence[Tensor | None] | None,
    hyper: LionHyper,
) -> None:
    """Cautious Lion on local shards with the mask mean of each whole tensor.

    ``params``, ``grads``, ``exp_avgs``: local tensors; ``layouts``: the tensors as the
    optimizer holds them (DTensor or plain), for the reduction. The mask counts are exact
    integers, so count/numel equals the unsharded ``mean()`` bitwise (DTensor's own ``mean``
    averages per-shard means, which does not). The math is the reference loop's, op for op.
    """
    moments = list(exp_avgs)
    requantize = []
    for i, p in enumerate(params):
        scale = None if exp_avg_scales is None else exp_avg_scales[i]
        if scale is not None:
            values = dequantize(exp_avgs[i], scale)
            moments[i] = values[: p.numel()].view(p.shape)
            requantize.append((values, exp_avgs[i], scale))
    staged = []
    counts = []
    for p, g, m in zip(params, grads, moments, strict=True):
        if hyper.maximize:
            g = -g
        low = is_low_precision(p) or is_low_precision(m)
        theta, mom, grad = (p.float(), m.float(), g.float()) if low else (p, m, g.to(p.dtype))
        direction = torch.sign(mom * hyper.beta1 + grad * (1 - hyper.beta1))
        agree = (direction * grad > 0).to(direction.dtype)
        counts.append(agree.sum(dtype=torch.float64))
        staged.append((low, theta, mom, grad, direction, agree))
    totals = mesh_reduce(torch.stack(counts), layouts, "sum") if counts else []
    lrs = hyper.lrs(len(params))
    for i, (p, m) in enumerate(zip(params, moments, strict=True)):
        low, theta, mom, grad, direction, agree = staged[i]
        mean = totals[i].to(direction.dtype) / layouts[i].numel()
        direction = direction * agree
        update = direction * mean.clamp(min=CAUTIOUS_MEAN_FLOOR).reciprocal()
        if hyper.weight_decay != 0:
            decay = 1 - lrs[i] * hyper.weight_decay
            if hyper.cautious_weight_decay:
                decays_here = direction * theta >= 0
                theta.copy_(torch.where(decays_here, theta * decay, theta))
            else:
                theta.mul_(decay)
        theta.add_(update, alpha=-lrs[i])
        mom.mul_(hyper.beta2).add_(grad, alpha=1 - hyper.beta2)
        if low:
            p.copy_(theta)
            m.copy_(mom)
    for values, codes, scale in requantize:
        quantize_into(values, codes, scale)


def global_index(tensor: Tensor) -> Tensor | None:
    """Each local element's row-major index in the global tensor (int64); None for plain."""
    if not is_dtensor(tensor):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, tensor.placements
    )
    index = torch.zeros(shape, dtype=torch.int64)
    stride = 1
    for dim in reversed(range(len(shape))):
        view = [1] * len(shape)
        view[dim] = shape[dim]
        index += (torch.arange(shape[dim], dtype=torch.int64) + offset[dim]).view(view) * stride
        stride *= tensor.shape[dim]
    return index.reshape(-1)


def _shard_dims(tensor: Tensor) -> tuple[int, ...]:
    return tuple(d for d, p in enumerate(tensor.placements) if isinstance(p, Shard))


def mesh_reduce(values: Tensor, tensors: Sequence[Tensor], op: str) -> Tensor:
    """Reduce ``values[i]`` (one per tensor) over the mesh dims that shard ``tensors[i]``.

    ``op`` is "sum" or "max"; one all-reduce per (mesh, dimension) for the whole list.
    Every rank of a mesh must call it with the same tensors (collectives).
    """
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    keys: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if is_dtensor(t) and _shard_dims(t):
            keys.setdefault((id(t.device_mesh), _shard_dims(t)), []).append(i)
    for indices in keys.values():
        mesh = tensors[indices[0]].device_mesh
        picked = values[indices].contiguous()
        for dim in _shard_dims(tensors[indices[0]]):
            dist.all_reduce(picked, op=reduce_op, group=mesh.get_group(dim))
        values[indices] = picked
    return values


def tensor_norms(
    tensors: list[Tensor], ord: float, dtype: torch.dtype | None = None
) -> list[Tensor]:
    """``torch._foreach_norm(tensors, ord, dtype=dtype)`` over whole tensors, DTensors included.

    ``ord`` is 2 or inf. For DTensors, local norms are reduced over the mesh: squares summed in
    float64 for 2, max for inf (a NaN counts as inf, so a non-finite value anywhere shows).
    """
    if not any_dtensor(tensors):
        return list(torch._foreach_norm(tensors, ord, dtype=dtype))
    shards = [local(t) for t in tensors]
    norms = []
    for shard in shards:  # _foreach_norm's inf-norm rejects empty shards
        if shard.numel() == 0:
            norms.append(torch.zeros((), dtype=dtype or shard.dtype))
        else:
            norms.append(torch.linalg.vector_norm(shard, ord, dtype=dtype))
    values = torch.stack([n.to(torch.float64).cpu() for n in norms])
    if ord == math.inf:
        values = mesh_reduce(torch.nan_to_num(values, nan=math.inf), tensors, "max")
    elif ord == 2:
        values = mesh_reduce(values.square(), tensors, "sum").sqrt()
    else:
        raise ValueError(f"tensor_norms: ord must be 2 or inf, got {ord}")
    return [v.to(n.dtype) for v, n in zip(values, norms, strict=True)]


def convert_momentum(state: dict, param: Tensor, momentum_dtype: torch.dtype | str | None) -> None:
    """``kernels.quantized.convert_momentum`` for a DTensor parameter.

    8-bit codes and scales are the local shard's (plain tensors); the decision to quantise
    uses the global numel. Other formats are DTensors laid out like the parameter.
    """
    shard = param.to_local()
    if quantizes(param, momentum_dtype):
        if "exp_avg_scale" in state:
            return
        if "exp_avg" in state:
            values = local(state["exp_avg"]).to(shard.device).reshape(shard.shape)
        else:
            values = torch.zeros_like(shard, dtype=torch.float32)
        state["exp_avg"], state["exp_avg_scale"] = quantize(values)
        return
    if "exp_avg_scale" in state:  # 8-bit codes of the shard → a DTensor momentum
        values = dequantize(state.pop("exp_avg"), state.pop("exp_avg_scale"))
        dtype = param.dtype if momentum_dtype in (None, INT8) else momentum_dtype
        if momentum_dtype == INT8:
            dtype = torch.promote_types(param.dtype, torch.float32)
        shard_values = values[: shard.numel()].view(shard.shape).to(dtype).clone()
        state["exp_avg"] = _like(param, shard_values)
        return
    convert_plain_momentum(state, param, momentum_dtype)  # DTensor ops keep the layout


def present_state(optimizer: Any, state_dict: dict) -> dict:
    """``state_dict`` post-hook: 8-bit momenta of DTensor parameters as fp32 DTensors.

    The codes are per local shard, so they would not reshard; the fp32 values do. The
    optimizer's own state is not touched (the entries are replaced, not edited).
    """
    saved = state_dict["state"]
    for group, saved_group in zip(optimizer.param_groups, state_dict["param_groups"]):
        for param, pid in zip(group["params"], saved_group["params"]):
            entry = saved.get(pid)
            if not is_dtensor(param) or not entry or "exp_avg_scale" not in entry:
                continue
            shard = param.to_local()
            values = dequantize(entry["exp_avg"], entry["exp_avg_scale"])
            momentum = _like(param, values[: shard.numel()].view(shard.shape))
            entry = {k: v for k, v in entry.items() if k != "exp_avg_scale"}
            entry["exp_avg"] = momentum
            saved[pid] = entry
    return state_dict


def requantize_loaded(optimizer: Any, state_dict: dict) -> None:
    """``load_state_dict`` pre-hook: re-quantise fp32 DTensor momenta for 8-bit groups.

    Runs after the shape check and before anything is loaded; a momentum whose mesh or
    placements differ from its parameter's raises ValueError.
    """
    saved = state_dict.get("state", {})
    for group, saved_group in zip(optimizer.param_groups, state_dict.get("param_groups", [])):
        for param, pid in zip(group["params"], saved_group["params"]):
            entry = saved.get(pid)
            if not is_dtensor(param) or not entry or "exp_avg_scale" in entry:
                continue
            momentum = entry.get("exp_avg")
            if not isinstance(momentum, Tensor):
                continue
            if not is_dtensor(momentum) or not _same_layout(param, momentum):
                raise ValueError(
                    f"Invalid state for parameter {pid}: exp_avg is {_describe(momentum)}, the "
                    f"parameter {_describe(param)}"
                )
            if not quantizes(param, group["momentum_dtype"]):
                continue
            codes, scales = quantize(momentum.to_local().reshape(param.to_local().shape))
            saved[pid] = {**entry, "exp_avg": codes, "exp_avg_scale": scales}
