"""Momentum formats: how one parameter's momentum is stored, as an object.

A group's ``momentum_dtype`` (the user-facing, checkpointed value: None, ``torch.float32``,
``torch.bfloat16`` or ``"int8"``) is turned into a format once per group by
``resolve_format``. The format owns everything that depends on the storage:

- ``prepare(state, param)``: create the momentum, or convert a loaded one, to this format, and
  return ``(momentum, scale)`` for the step (``scale`` is None for a plain momentum);
- ``kind``: the registry key the fused backends declare (``"plain"`` or ``"int8"``);
- ``fits(saved_state, param)``: whether a saved momentum fits its parameter (``load_state_dict``);
- ``fp32_view(state, param)``: the momentum as a float tensor shaped like the parameter.

Nothing outside ``lionopt.state`` tests the state dict's keys to learn a momentum's storage:
``stored_kind(state)`` is the one place that does.

The state keys are the checkpoint format and are unchanged: ``state["exp_avg"]`` (a tensor like
the parameter, or for 8-bit flat int8 codes padded to whole blocks) and, for 8-bit only,
``state["exp_avg_scale"]`` (fp32, one absmax per block; see ``lionopt.state.int8``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lionopt.state import dtensor, int8

__all__ = [
    "INT8_KIND",
    "PLAIN_KIND",
    "Int8Blockwise",
    "MomentumFormat",
    "Plain",
    "fits",
    "fp32_view",
    "normalize_momentum_dtype",
    "resolve_format",
    "scale_of",
    "stored_kind",
]

PLAIN_KIND = "plain"
INT8_KIND = "int8"
_SCALE_KEY = "exp_avg_scale"

_ALIASES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "int8": "int8",
    "8bit": "int8",
}


class MomentumFormat:
    """The storage of one group's momenta (see the module docstring)."""

    kind: str = PLAIN_KIND
    #: The ``momentum_dtype`` value this format stands for (stored in the group).
    value: Any = None

    def prepare(self, state: dict, param: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def kind_for(self, param: Tensor) -> str:
        """The kind of storage ``param``'s momentum has under this format."""
        return self.kind

    def plain_dtype(self) -> torch.dtype | None:
        """The dtype every momentum has (plain formats; None: any), for the C++ group step."""
        raise NotImplementedError

    def fits(self, saved_state: dict, param: Tensor) -> bool:
        """Whether a saved momentum fits ``param`` (checked before ``load_state_dict`` loads)."""
        return fits(saved_state, param)

    def fp32_view(self, state: dict, param: Tensor) -> Tensor:
        """``state``'s momentum as a float tensor shaped like ``param``."""
        return fp32_view(state, param)


@dataclass(frozen=True)
class Plain(MomentumFormat):
    """A momentum tensor shaped like its parameter, of ``dtype`` (None: the parameter's).

    Under None an existing momentum keeps its dtype (a loaded fp32 momentum of a bf16
    parameter stays fp32); an 8-bit one is dequantised to the parameter's dtype.
    """

    dtype: torch.dtype | None = None

    kind = PLAIN_KIND

    @property
    def value(self) -> torch.dtype | None:
        return self.dtype

    def plain_dtype(self) -> torch.dtype | None:
        return self.dtype

    def dtype_for(self, param: Tensor) -> torch.dtype:
        if self.dtype is None or param.is_complex():
            return param.dtype
        return self.dtype

    def prepare(self, state: dict, param: Tensor) -> tuple[Tensor, None]:
        momentum = state.get("exp_avg")
        if momentum is None:
            momentum = torch.zeros_like(
                param, dtype=self.dtype_for(param), memory_format=torch.preserve_format
            )
            state["exp_avg"] = momentum
        elif _SCALE_KEY in state or (
            self.dtype is not None and momentum.dtype != self.dtype_for(param)
        ):
            values = fp32_view(state, param).to(param.device)
            state.pop(_SCALE_KEY, None)
            momentum = values.to(self.dtype_for(param)).clone(memory_format=torch.contiguous_format)
            state["exp_avg"] = momentum
        return momentum, None


@dataclass(frozen=True)
class Int8Blockwise(MomentumFormat):
    """8-bit blockwise momentum (``lionopt.state.int8``): 1.016 bytes per parameter.

    Parameters under ``min_numel`` elements, and complex ones, keep an fp32 momentum (the
    ``Plain(float32)`` storage): the scales would cost more than they save.
    """

    block: int = int8.BLOCK
    min_numel: int = int8.MIN_NUMEL

    kind = INT8_KIND
    value = "int8"

    def __post_init__(self) -> None:
        if self.block != int8.BLOCK:
            raise ValueError(f"Invalid block value: {self.block}; the kernels use {int8.BLOCK}")
        if isinstance(self.min_numel, bool) or not isinstance(self.min_numel, int):
            raise ValueError(f"Invalid min_numel value: {self.min_numel!r}")
        if self.min_numel < 1:
            raise ValueError(f"Invalid min_numel value: {self.min_numel!r}")

    def plain_dtype(self) -> torch.dtype | None:
        raise TypeError("8-bit momentum is not a plain format")

    def quantizes(self, param: Tensor) -> bool:
        """Whether ``param``'s momentum is stored in 8 bits."""
        return param.numel() >= self.min_numel and param.is_floating_point()

    def kind_for(self, param: Tensor) -> str:
        return INT8_KIND if self.quantizes(param) else PLAIN_KIND

    def prepare(self, state: dict, param: Tensor) -> tuple[Tensor, Tensor | None]:
        if not self.quantizes(param):
            dtype = torch.promote_types(param.dtype, torch.float32)
            return _PLAIN_FALLBACK.get(dtype, Plain(dtype)).prepare(state, param)
        if dtensor.is_dtensor(param):  # FSDP2: codes of the local shard (state.dtensor)
            return dtensor.prepare_int8(state, param)
        if _SCALE_KEY not in state:
            if "exp_avg" in state:
                values = state["exp_avg"].to(param.device).view(param.shape)
            else:
                values = torch.zeros_like(param, dtype=torch.float32)
            state["exp_avg"], state[_SCALE_KEY] = int8.quantize(values)
        return state["exp_avg"], state[_SCALE_KEY]


_PLAIN_FALLBACK = {torch.float32: Plain(torch.float32), torch.float64: Plain(torch.float64)}
_FORMATS = {
    None: Plain(None),
    torch.float32: Plain(torch.float32),
    torch.bfloat16: Plain(torch.bfloat16),
    "int8": Int8Blockwise(),
}


def normalize_momentum_dtype(value: Any) -> torch.dtype | str | None:
    """None, ``torch.float32``, ``torch.bfloat16`` or ``"int8"``; ValueError for anything else."""
    if value is None or value in (torch.float32, torch.bfloat16):
        return value
    if value is torch.int8:
        return "int8"
    if isinstance(value, str) and value.lower() in _ALIASES:
        return _ALIASES[value.lower()]
    raise ValueError(f"Invalid momentum_dtype value: {value!r}")


def resolve_format(momentum_dtype: Any) -> MomentumFormat:
    """The format object for a group's ``momentum_dtype`` (a format object passes through)."""
    if isinstance(momentum_dtype, MomentumFormat):
        return momentum_dtype
    return _FORMATS[normalize_momentum_dtype(momentum_dtype)]


def stored_kind(state: dict) -> str:
    """The kind of storage ``state``'s momentum has now (``"int8"`` or ``"plain"``)."""
    return INT8_KIND if _SCALE_KEY in state else PLAIN_KIND


def scale_of(state: dict) -> Tensor | None:
    """The 8-bit block scales of ``state``'s momentum; None for a plain momentum."""
    return state.get(_SCALE_KEY)


def fits(saved_state: dict, param: Tensor) -> bool:
    """Whether a saved momentum (plain or 8-bit) has the size its parameter needs."""
    momentum = saved_state.get("exp_avg")
    if not isinstance(momentum, Tensor):
        return True
    if stored_kind(saved_state) == INT8_KIND:  # flat codes padded to whole blocks
        return momentum.numel() == int8.padded_numel(param.numel())
    return momentum.shape == param.shape


def fp32_view(state: dict, param: Tensor) -> Tensor:
    """The momentum of ``state`` shaped like ``param``: dequantised (fp32) for 8-bit storage,
    else the stored tensor itself (its own dtype)."""
    if stored_kind(state) == INT8_KIND:
        if dtensor.is_dtensor(param):  # codes of the local shard
            return dtensor.fp32_view(state, param)
        values = int8.dequantize(state["exp_avg"], state[_SCALE_KEY])
        return values[: param.numel()].view(param.shape)
    return state["exp_avg"].view(param.shape)
