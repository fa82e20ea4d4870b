"""Momentum state of DTensor parameters (FSDP2, HSDP): created on the local shard, reshardable.

A plain momentum of a DTensor parameter is itself a DTensor with the parameter's mesh and
placements (``torch.zeros_like`` keeps them), so ``torch.distributed.checkpoint`` reshards it.

8-bit momentum is quantised per local shard: the codes and scales are plain tensors holding the
shard's elements in blocks of 256 (``lionopt.state.int8``), which is what the step needs. Those
blocks follow the shard boundaries, so they would not reshard: the optimizer's ``state_dict()``
presents each such momentum as an fp32 DTensor laid out like its parameter (``present_state``),
and ``load_state_dict`` re-quantises it on the new shards (``requantize_loaded``). Whether a
parameter is quantised is decided on its global numel, so the format does not depend on the
world size. The checkpoint costs 4 bytes per 8-bit momentum element while it is written (the
training state stays 1.016).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lionopt.state import int8

try:  # some torch builds have no torch.distributed
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None

__all__ = [
    "any_dtensor",
    "describe",
    "fp32_view",
    "is_dtensor",
    "like",
    "local",
    "prepare_int8",
    "present_state",
    "requantize_loaded",
    "same_layout",
]

_SCALE_KEY = "exp_avg_scale"


def is_dtensor(tensor: object) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def any_dtensor(*lists) -> bool:
    """Whether any tensor in ``lists`` is a DTensor."""
    if DTensor is None or not torch.distributed.is_initialized():  # no mesh, no DTensor
        return False
    return any(isinstance(t, DTensor) for tensors in lists for t in tensors)


def local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (a plain tensor sharing its storage); others as they are."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def like(param: Tensor, shard: Tensor) -> Tensor:
    """``shard`` as a DTensor laid out like ``param`` (sharing storage); plain ``param``: as is."""
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


def same_layout(a: Tensor, b: Tensor) -> bool:
    mesh_a, mesh_b = a.device_mesh, b.device_mesh
    return (mesh_a is mesh_b or mesh_a == mesh_b) and a.placements == b.placements


def describe(tensor: Tensor) -> str:
    if is_dtensor(tensor):
        return f"a DTensor with placements {tuple(tensor.placements)} on {tensor.device_mesh}"
    return f"a plain {type(tensor).__name__} of shape {tuple(tensor.shape)}"


def prepare_int8(state: dict, param: Tensor) -> tuple[Tensor, Tensor]:
    """Codes and scales of the local shard of DTensor ``param`` (created or converted)."""
    if _SCALE_KEY not in state:
        shard = param.to_local()
        if "exp_avg" in state:
            values = local(state["exp_avg"]).to(shard.device).reshape(shard.shape)
        else:
            values = torch.zeros_like(shard, dtype=torch.float32)
        state["exp_avg"], state[_SCALE_KEY] = int8.quantize(values)
    return state["exp_avg"], state[_SCALE_KEY]


def fp32_view(state: dict, param: Tensor) -> Tensor:
    """An 8-bit momentum of DTensor ``param`` as an fp32 DTensor laid out like ``param``."""
    shard = param.to_local()
    values = int8.dequantize(state["exp_avg"], state[_SCALE_KEY])
    return like(param, values[: shard.numel()].view(shard.shape))


def present_state(optimizer: Any, state_dict: dict) -> dict:
    """``state_dict`` post-hook: 8-bit momenta of DTensor parameters as fp32 DTensors.

    The optimizer's own state is not touched (entries are replaced, not edited).
    """
    saved = state_dict["state"]
    for group, saved_group in zip(optimizer.param_groups, state_dict["param_groups"]):
        for param, pid in zip(group["params"], saved_group["params"]):
            entry = saved.get(pid)
            if not is_dtensor(param) or not entry or _SCALE_KEY not in entry:
                continue
            entry = {k: v for k, v in entry.items() if k != _SCALE_KEY}
            entry["exp_avg"] = fp32_view(saved[pid], param)
            saved[pid] = entry
    return state_dict


def requantize_loaded(optimizer: Any, state_dict: dict, quantizes) -> None:
    """``load_state_dict`` pre-hook body: re-quantise fp32 DTensor momenta on the local shards.

    ``quantizes(group, param)``: whether the group's format stores ``param`` in 8 bits. A saved
    momentum whose mesh or placements differ from its parameter's raises ValueError (checked
    for every parameter before any entry is replaced).
    """
    saved = state_dict.get("state", {})
    todo = []
    for group, saved_group in zip(optimizer.param_groups, state_dict.get("param_groups", [])):
        for param, pid in zip(group["params"], saved_group["params"]):
            entry = saved.get(pid)
            if not is_dtensor(param) or not entry or _SCALE_KEY in entry:
                continue
            momentum = entry.get("exp_avg")
            if not isinstance(momentum, Tensor):
                continue
            if not is_dtensor(momentum) or not same_layout(param, momentum):
                raise ValueError(
                    f"Invalid state for parameter {pid}: exp_avg is {describe(momentum)}, the "
                    f"parameter {describe(param)} (load sharded checkpoints with "
                    "torch.distributed.checkpoint)"
                )
            if quantizes(group, param):
                todo.append((pid, entry, momentum, param))
    if todo:  # torch copied the outer dict only: never write into the caller's "state"
        saved = state_dict["state"] = dict(saved)
    for pid, entry, momentum, param in todo:
        codes, scales = int8.quantize(momentum.to_local().reshape(param.to_local().shape))
        saved[pid] = {**entry, "exp_avg": codes, _SCALE_KEY: scales}
