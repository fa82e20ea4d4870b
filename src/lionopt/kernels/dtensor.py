"""DTensor tensors (FSDP2 ``fully_shard``, HSDP, tensor parallel) in the step: local shards.

FSDP2 makes every parameter, gradient and momentum a ``DTensor``; ``to_local()`` is a plain
tensor sharing the shard's storage. Lion's update is elementwise, so ``functional.lion`` gives
every implementation (fused C++, Triton, foreach, loop, 8-bit) the local shards and the result
equals the unsharded step exactly; no kernel ever takes ``data_ptr()`` of a DTensor. What the
rule takes over a whole tensor goes through ``MeshStats`` (the groups' ``stats``), which
reduces over the mesh dimensions that shard the tensor:

- cautious' mask mean: the shard's count and numel, summed (exact integers, so the mean equals
  the unsharded ``mean()`` bitwise; DTensor's own ``mean`` averages per-shard means and does
  not). Groups that need it are stepped by foreach or the loop, which call ``stats.mean``;
- Tiger's RMS and non-finite check: ``norms`` (local norms, one all-reduce per mesh dimension
  for a whole list; a 2-norm may differ from the unsharded one in the last bit);
- stochastic rounding: ``stage_rounding`` steps bf16 parameters in fp32 copies and rounds them
  with each element's global index, so a sharded run rounds exactly as the unsharded one.

``check_group`` raises ValueError, before anything changes, for what a local step cannot do: a
gradient or momentum whose mesh or placements differ from its parameter's, a ``Partial``
placement, a DTensor gradient of a plain parameter, or stochastic rounding under a strided
shard (no contiguous global index).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from lionopt.kernels.group import LOCAL_STATS, LocalStats, TensorGroup
from lionopt.kernels.hyper import LionHyper
from lionopt.kernels.rounding import stochastic_round_bf16
from lionopt.state.dtensor import any_dtensor, describe, is_dtensor, like, local, same_layout
from lionopt.state.formats import INT8_KIND, PLAIN_KIND

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Partial, Shard
except ImportError:  # pragma: no cover
    dist = DTensor = None

__all__ = [
    "MeshStats",
    "any_dtensor",
    "any_wrapper",
    "check_group",
    "global_index",
    "group_tensors",
    "local",
    "reduce_rows",
    "stage_rounding",
]


_DEFAULT_DISPATCH = torch.Tensor.__torch_dispatch__
_PLAIN = frozenset({torch.Tensor, torch.nn.Parameter})


def any_wrapper(*lists: Sequence[Tensor]) -> bool:
    """Whether a tensor is a wrapper subclass other than DTensor (its own
    ``__torch_dispatch__``: FakeTensor, torchao's, test subclasses): its ``data_ptr()`` is not
    its data, so it must never reach a fused kernel. ``nn.Parameter`` and plain subclasses of
    it are not wrappers; DTensors are stepped on their local shards."""
    types = set()
    for tensors in lists:
        types.update(map(type, tensors))  # C speed: a step may hold thousands of tensors
    return any(
        cls.__torch_dispatch__ is not _DEFAULT_DISPATCH
        and not (DTensor is not None and issubclass(cls, DTensor))
        for cls in types - _PLAIN
    )


def _shard_dims(tensor: Tensor) -> tuple[int, ...]:
    return tuple(d for d, p in enumerate(tensor.placements) if isinstance(p, Shard))


def _reduce(values: Tensor, tensors: Sequence[Tensor | None], op, mesh=None, dims=()) -> Tensor:
    """Reduce ``values[i]`` over the mesh dims sharding ``tensors[i]`` (a DTensor), or over
    ``mesh``/``dims`` for plain entries; one all-reduce per (mesh, dim) for the whole list."""
    keys: dict[tuple, tuple] = {}
    for i, t in enumerate(tensors):
        if is_dtensor(t):
            t_mesh, t_dims = t.device_mesh, _shard_dims(t)
        else:
            t_mesh, t_dims = mesh, dims
        if t_mesh is None or not t_dims:
            continue
        entry = keys.setdefault((id(t_mesh), t_dims), (t_mesh, t_dims, []))
        entry[2].append(i)
    for t_mesh, t_dims, indices in keys.values():
        picked = values[indices].contiguous()
        for dim in t_dims:
            dist.all_reduce(picked, op=op, group=t_mesh.get_group(dim))
        values[indices] = picked
    return values


def reduce_rows(values: Tensor, tensors: Sequence[Tensor], op: str) -> Tensor:
    """``values[i]`` (a row of figures of ``tensors[i]``'s local shard) summed ("sum") or
    maxed ("max") over the mesh dims that shard ``tensors[i]``; plain tensors' rows as they are."""
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    return _reduce(values.clone(), tensors, reduce_op)


class MeshStats(LocalStats):
    """Whole-tensor statistics of sharded tensors: local figures reduced over the mesh.

    DTensor arguments are reduced over their own mesh; plain arguments (the local shards a
    step body sees) over ``mesh``'s ``dims``, the layout of the group they belong to.
    Every rank of the mesh must make the same calls (they are collectives).
    """

    local = False

    def __init__(self, mesh=None, dims: tuple[int, ...] = ()) -> None:
        self.mesh = mesh
        self.dims = dims

    def numel(self, tensor: Tensor) -> int:
        if is_dtensor(tensor) or self.mesh is None or not self.dims:
            return tensor.numel()
        device = torch.device(self.mesh.device_type)  # NCCL reduces device tensors only
        count = torch.tensor([float(tensor.numel())], dtype=torch.float64, device=device)
        return int(_reduce(count, [None], dist.ReduceOp.SUM, self.mesh, self.dims)[0])

    def mean(self, tensor: Tensor) -> Tensor:
        """Sum (in float64) and count, reduced: exact, and bitwise ``mean()``, for 0/1 masks."""
        shard = local(tensor)
        figures = torch.stack(
            [
                shard.sum(dtype=torch.float64),
                torch.tensor(float(shard.numel()), dtype=torch.float64, device=shard.device),
            ]
        ).unsqueeze(0)
        figures = _reduce(figures, [tensor], dist.ReduceOp.SUM, self.mesh, self.dims)[0]
        return figures[0].to(shard.dtype) / figures[1].to(shard.dtype)

    def norms(
        self, tensors: list[Tensor], ord: float, dtype: torch.dtype | None = None
    ) -> list[Tensor]:
        """Each whole tensor's norm: local squares summed in float64 (2), or max (inf; a NaN
        counts as inf so that a non-finite value on any shard shows)."""
        norms = []
        for t in tensors:
            shard = local(t)
            if shard.numel() == 0:  # an empty shard (more ranks than rows)
                norms.append(torch.zeros((), dtype=dtype or shard.dtype, device=shard.device))
            else:
                norms.append(torch.linalg.vector_norm(shard, ord, dtype=dtype))
        if not norms:
            return []
        values = torch.stack([n.to(torch.float64) for n in norms])
        if ord == math.inf:
            values = torch.nan_to_num(values, nan=math.inf)
            values = _reduce(values, tensors, dist.ReduceOp.MAX, self.mesh, self.dims)
        elif ord == 2:
            values = _reduce(values.square(), tensors, dist.ReduceOp.SUM, self.mesh, self.dims)
            values = values.sqrt()
        else:
            raise ValueError(f"MeshStats.norms: ord must be 2 or inf, got {ord}")
        return [v.to(n.dtype) for v, n in zip(values, norms, strict=True)]

    def row_rms(self, tensor: Tensor) -> Tensor:
        """Rows are whole on their shard under ``Shard(0)``; DTensor ops handle the rest."""
        return super().row_rms(tensor)


_STATS: dict[tuple, MeshStats] = {}


def _stats(mesh, dims: tuple[int, ...]) -> MeshStats:
    key = (id(mesh), dims)
    stats = _STATS.get(key)
    if stats is None or stats.mesh is not mesh:
        stats = _STATS[key] = MeshStats(mesh, dims)
    return stats


def check_group(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_scales: Sequence[Tensor | None] | None = None,
    *,
    rounding: bool = False,
) -> None:
    """ValueError for a tensor the local-shard step cannot take; checks all before any step."""
    checked = set()  # placements already checked (one tuple per layout, not per tensor)
    for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs, strict=True)):
        quantized = exp_avg_scales is not None and exp_avg_scales[i] is not None
        if not is_dtensor(p):
            if is_dtensor(g) or is_dtensor(m):
                raise ValueError(
                    f"parameter {i} is a plain tensor but its gradient is {describe(g)} and its "
                    f"momentum {describe(m)}: use DTensors for all three or for none"
                )
            continue
        for placement in () if p.placements in checked else p.placements:
            if isinstance(placement, Partial):
                raise ValueError(
                    f"parameter {i} has a Partial placement ({tuple(p.placements)}): its local "
                    "values are not the parameter's values; redistribute it to Shard or Replicate"
                )
            if rounding and isinstance(placement, Shard) and type(placement) is not Shard:
                raise ValueError(
                    f"parameter {i} has placement {placement}: stochastic rounding needs each "
                    "element's global index, implemented for Shard and Replicate placements"
                )
        checked.add(p.placements)
        if not is_dtensor(g) or not same_layout(p, g):
            raise ValueError(
                f"parameter {i} is {describe(p)}, its gradient {describe(g)}: the step runs on "
                "local shards, so the gradient needs the parameter's mesh and placements"
            )
        if quantized:
            if is_dtensor(m):
                raise ValueError(f"parameter {i}: 8-bit momentum codes must be the local shard's")
        elif not is_dtensor(m) or not same_layout(p, m):
            raise ValueError(
                f"parameter {i} is {describe(p)}, its momentum {describe(m)}: the momentum needs "
                "the parameter's mesh and placements (load checkpoints of sharded models with "
                "torch.distributed.checkpoint)"
            )


def group_tensors(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_scales: Sequence[Tensor | None] | None = None,
) -> list[TensorGroup]:
    """``functional.group_tensors`` for lists holding DTensors: groups of local shards.

    Also keyed by mesh and placements, so each group's ``MeshStats`` knows what to reduce over;
    plain tensors of a mixed list get ``LocalStats``.
    """
    groups: dict[tuple, TensorGroup] = {}
    for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs, strict=True)):
        scale = None if exp_avg_scales is None else exp_avg_scales[i]
        kind = PLAIN_KIND if scale is None else INT8_KIND
        layout = (id(p.device_mesh), tuple(p.placements)) if is_dtensor(p) else None
        lp, lg, lm = local(p), local(g), local(m)
        if kind == PLAIN_KIND and lm.dtype == torch.int8:
            raise ValueError("int8 exp_avgs (8-bit momentum) need their exp_avg_scales")
        key = (lp.device, lp.dtype, lg.dtype, lm.dtype, kind, layout)
        group = groups.get(key)
        if group is None:
            stats = _stats(p.device_mesh, _shard_dims(p)) if layout else LOCAL_STATS
            group = groups[key] = TensorGroup(
                [], [], [], kind, None if scale is None else [], [], stats
            )
        group.params.append(lp)
        group.grads.append(lg)
        group.momenta.append(lm)
        group.indices.append(i)
        if scale is not None:
            group.scales.append(scale)
    return list(groups.values())


def global_index(tensor: Tensor) -> Tensor | None:
    """Each local element's row-major index in the global tensor (int64, flat); None for a
    plain tensor (its own index is global)."""
    if not is_dtensor(tensor):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, tensor.placements
    )
    device = tensor.to_local().device
    index = torch.zeros(shape, dtype=torch.int64, device=device)
    stride = 1
    for dim in reversed(range(len(shape))):
        view = [1] * len(shape)
        view[dim] = shape[dim]
        steps = torch.arange(shape[dim], dtype=torch.int64, device=device) + offset[dim]
        index += steps.view(view) * stride
        stride *= tensor.shape[dim]
    return index.reshape(-1)


def stage_rounding(
    params: list[Tensor], hyper: LionHyper
) -> tuple[list[Tensor], LionHyper, Callable[[], None] | None]:
    """Stochastic rounding of sharded bf16 parameters: the step goes to fp32 copies (the math
    is fp32 anyway) with no rounding keys, and ``finish()`` rounds each copy into its
    parameter with the elements' global indices. Returns (params, hyper, finish)."""
    keys = hyper.rounding_keys
    if keys is None or not any(p.dtype == torch.bfloat16 for p in params):
        return params, hyper, None
    staged = []
    pairs = []
    for p, key in zip(params, keys, strict=True):
        if p.dtype != torch.bfloat16:
            staged.append(p)
            continue
        shard = local(p)
        copy = shard.float()
        pairs.append((p, shard, copy, key))
        staged.append(like(p, copy))

    def finish() -> None:
        for p, shard, copy, key in pairs:
            shard.copy_(stochastic_round_bf16(copy, key, global_index(p)))

    return staged, replace(hyper, rounding_keys=None), finish
