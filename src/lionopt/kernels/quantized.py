"""8-bit blockwise momentum: the storage format, and the Lion step over it.

Format (``momentum_dtype="int8"``), per parameter of at least ``MIN_NUMEL`` elements:

- ``state["exp_avg"]``: int8 codes, flat, the parameter's elements in row-major order,
  zero-padded to a multiple of ``BLOCK`` = 256;
- ``state["exp_avg_scale"]``: fp32, one per block: the block's absmax a (over finite values).

A code k in [-127, 127] stands for ``sign(k)·(k/127)²·a``, computed as ``(k·|k|)·(a/16129)``;
code −128 stands for a non-finite value (NaN), so a NaN gradient poisons one coordinate, as
in the reference, not its block. Encoding rounds to the nearest code in value, ties away from
zero. That is 1 + 4/256 = 1.016 bytes per parameter.

Why a square-law map with round-to-nearest: on a 500-step digits MLP run, the share of
(step, coordinate) pairs where sign(c) from the 8-bit momentum differs from an exact fp32
momentum fed the same gradients was 1.35% for the square law, 2.7% for a linear int8 map and
1.45% for a 1.5-power map; stochastic requantisation was worse (1.8%: its noise costs more
than the bias it removes). The square law keeps 6e-5·a as its smallest step (linear: a/127),
needs no lookup table and encodes in closed form: s = floor(sqrt(y)) with y = |v|/(a/16129),
then k = min(s + [y ≥ s² + s + ½], 127). The magnitude is encoded first and the sign applied
after, so a dequantised value never has the opposite sign of the value encoded, and 0 stays 0.

Parameters below ``MIN_NUMEL`` elements (biases, norm gains) and complex parameters keep an
fp32 momentum: the scale would cost more than it saves and their share of memory is small.

The step dequantises, runs the reference Lion math in fp32, and requantises:
``quantized_lion`` dispatches to the fused C++ kernel (``fused_quant_cpu``), the vectorised
torch path (one dequantise/quantise over the whole group, then the foreach step) or the loop
(one tensor at a time, the reference step). All three are bitwise equal.
"""

from __future__ import annotations

import warnings
from functools import cache
from typing import Any

import torch
from torch import Tensor

from lionopt.kernels._common import LionHyper
from lionopt.kernels.foreach import multi_tensor_lion
from lionopt.kernels.reference import single_tensor_lion

__all__ = [
    "BLOCK",
    "MIN_NUMEL",
    "convert_loaded_state",
    "convert_momentum",
    "dequantize",
    "momentum_tensor",
    "normalize_momentum_dtype",
    "quantize",
    "quantized_lion",
    "remember_loaded_state",
]

BLOCK = 256
MIN_NUMEL = 4096
CODE_MAX = 127
NAN_CODE = -128
_LEVELS = CODE_MAX * CODE_MAX

INT8 = "int8"
_ALIASES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "int8": INT8,
    "8bit": INT8,
}


def normalize_momentum_dtype(value: Any) -> torch.dtype | str | None:
    """None, ``torch.float32``, ``torch.bfloat16`` or ``"int8"``; ValueError for anything else."""
    if value is None or value in (torch.float32, torch.bfloat16):
        return value
    if value is torch.int8:
        return INT8
    if isinstance(value, str) and value.lower() in _ALIASES:
        return _ALIASES[value.lower()]
    raise ValueError(f"Invalid momentum_dtype value: {value!r}")


def padded_numel(numel: int) -> int:
    return -(-numel // BLOCK) * BLOCK


def quantizes(param: Tensor, momentum_dtype: torch.dtype | str | None) -> bool:
    """Whether ``param``'s momentum is stored in 8 bits under ``momentum_dtype``."""
    return momentum_dtype == INT8 and param.numel() >= MIN_NUMEL and param.is_floating_point()


def quantize(values: Tensor) -> tuple[Tensor, Tensor]:
    """Codes (int8, flat, padded) and per-block absmax (fp32) of ``values``."""
    flat = values.detach().reshape(-1).float()
    padded = torch.zeros(padded_numel(flat.numel()), dtype=torch.float32, device=flat.device)
    padded[: flat.numel()] = flat
    codes = torch.empty(padded.numel(), dtype=torch.int8, device=flat.device)
    scales = torch.empty(padded.numel() // BLOCK, dtype=torch.float32, device=flat.device)
    quantize_into(padded, codes, scales)
    return codes, scales


def quantize_into(padded: Tensor, codes: Tensor, scales: Tensor) -> None:
    """Encode fp32 ``padded`` (a multiple of BLOCK long) into ``codes`` and ``scales``, in place."""
    blocks = padded.view(-1, BLOCK)
    finite = torch.isfinite(blocks)
    magnitude = torch.where(finite, blocks.abs(), 0.0)
    absmax = magnitude.amax(dim=1)
    factor = (absmax / _LEVELS).unsqueeze(1)
    y = magnitude / torch.where(factor > 0, factor, 1.0)
    s = y.sqrt().floor()
    k = (s + (y >= s * s + s + 0.5)).clamp_(max=CODE_MAX)
    k = torch.where(factor > 0, k, 0.0).copysign_(blocks)
    codes.view(-1, BLOCK).copy_(torch.where(finite, k, NAN_CODE))
    scales.copy_(absmax)


def dequantize(codes: Tensor, scales: Tensor) -> Tensor:
    """The fp32 values of ``codes`` (flat, padded length)."""
    k = codes.view(-1, BLOCK).float()
    values = (k * k.abs()) * (scales / _LEVELS).unsqueeze(1)
    return torch.where(k == NAN_CODE, torch.nan, values).view(-1)


def momentum_tensor(state: dict, param: Tensor) -> Tensor:
    """The momentum of ``state`` as an fp32 (or its stored dtype) tensor shaped like ``param``."""
    if "exp_avg_scale" in state:
        values = dequantize(state["exp_avg"], state["exp_avg_scale"])
        return values[: param.numel()].view(param.shape)
    return state["exp_avg"].view(param.shape)


def momentum_dtype_for(param: Tensor, momentum_dtype: torch.dtype | str | None) -> torch.dtype:
    """The dtype of an unquantised momentum for ``param`` under ``momentum_dtype``."""
    if momentum_dtype is None or param.is_complex():
        return param.dtype
    if momentum_dtype == INT8:
        return torch.promote_types(param.dtype, torch.float32)
    return momentum_dtype


def convert_momentum(state: dict, param: Tensor, momentum_dtype: torch.dtype | str | None) -> None:
    """Create ``state``'s momentum, or convert it, to the format ``momentum_dtype`` asks for.

    A no-op when it already has that format; otherwise it (de)quantises or casts, so an fp32
    checkpoint loads into an 8-bit optimizer and the reverse. Under ``None`` an existing
    unquantised momentum keeps its dtype (as before this option existed); an 8-bit one is
    dequantised to the parameter's dtype.
    """
    quantized_now = "exp_avg_scale" in state
    if quantizes(param, momentum_dtype):
        if quantized_now:
            return
        if "exp_avg" in state:
            values = state["exp_avg"].to(param.device).view(param.shape)
        else:
            values = torch.zeros_like(param, dtype=torch.float32)
        state["exp_avg"], state["exp_avg_scale"] = quantize(values)
        return
    dtype = momentum_dtype_for(param, momentum_dtype)
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
    elif quantized_now or (momentum_dtype is not None and state["exp_avg"].dtype != dtype):
        values = momentum_tensor(state, param).to(param.device)
        state.pop("exp_avg_scale", None)
        state["exp_avg"] = values.to(dtype).clone(memory_format=torch.contiguous_format)


def remember_loaded_state(optimizer: Any, state_dict: dict) -> None:
    """``load_state_dict`` pre-hook: note the configured formats and the saved momenta.

    ``torch.optim.Optimizer.load_state_dict`` replaces the groups (and so ``momentum_dtype``)
    by the checkpoint's, and casts every floating-point state tensor to its parameter's dtype,
    which would round 8-bit scales or an fp32 momentum of a bf16 parameter. The post-hook
    restores the saved tensors instead and converts them to this optimizer's format.
    """
    optimizer._loading_momentum = (
        [group["momentum_dtype"] for group in optimizer.param_groups],
        [pid for group in state_dict["param_groups"] for pid in group["params"]],
        {pid: dict(state) for pid, state in state_dict["state"].items()},
    )


def convert_loaded_state(optimizer: Any) -> None:
    """``load_state_dict`` post-hook: see ``remember_loaded_state``."""
    configured, saved_ids, saved = optimizer.__dict__.pop("_loading_momentum")
    for group, momentum_dtype in zip(optimizer.param_groups, configured):
        group["momentum_dtype"] = momentum_dtype
    params = [(p, group) for group in optimizer.param_groups for p in group["params"]]
    for pid, (param, group) in zip(saved_ids, params):
        original = saved.get(pid, {})
        if "exp_avg" not in original:
            continue
        momentum_dtype = group["momentum_dtype"]
        if momentum_dtype is None and "exp_avg_scale" not in original:
            continue  # torch's own cast to the parameter's dtype stands
        state = optimizer.state[param]
        state.pop("exp_avg_scale", None)
        for key in ("exp_avg", "exp_avg_scale"):
            if key in original:
                state[key] = original[key].to(param.device, copy=True)
        convert_momentum(state, param, momentum_dtype)


def quantized_lion(
    params: list[Tensor],
    grads: list[Tensor],
    codes: list[Tensor],
    scales: list[Tensor],
    hyper: LionHyper,
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """One Lion step over tensors of one device and dtype with 8-bit momentum, in place."""
    if not params:
        return
    if fused is not False and foreach is not True:
        from lionopt.kernels import fused_quant_cpu

        runs = params[0].device.type == "cpu" and fused_quant_cpu.available()
        if runs and fused_quant_cpu.supports_quantized(params, grads, codes, scales, hyper):
            fused_quant_cpu.quantized_lion_step(params, grads, codes, scales, hyper)
            return
        if params[0].device.type == "cuda":
            from lionopt.kernels import triton_quant

            if triton_quant.available() and triton_quant.supports(
                params, grads, codes, hyper, scales=scales
            ):
                triton_quant.lion_step(params, grads, codes, hyper, scales=scales)
                return
        if fused:
            _warn_once(
                "lionopt: fused=True is not supported for these 8-bit momentum tensors "
                "(device, dtype, layout or options); using the foreach path."
            )
    if foreach is False:
        quantized_lion_loop(params, grads, codes, scales, hyper)
    else:
        quantized_lion_foreach(params, grads, codes, scales, hyper)


def quantized_lion_loop(
    params: list[Tensor],
    grads: list[Tensor],
    codes: list[Tensor],
    scales: list[Tensor],
    hyper: LionHyper,
) -> None:
    """One tensor at a time: dequantise, the reference step in fp32, requantise."""
    count = len(params)
    for i, (param, code, scale) in enumerate(zip(params, codes, scales)):
        values = dequantize(code, scale)
        moment = values[: param.numel()].view(param.shape)
        single_tensor_lion([param], [grads[i]], [moment], _one(hyper, i, count))
        quantize_into(values, code, scale)


def quantized_lion_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    codes: list[Tensor],
    scales: list[Tensor],
    hyper: LionHyper,
) -> None:
    """The whole group at once: one dequantise, the foreach step, one quantise."""
    values = dequantize(torch.cat(codes), torch.cat(scales))
    pieces = values.split([code.numel() for code in codes])
    moments = [piece[: p.numel()].view(p.shape) for piece, p in zip(pieces, params)]
    multi_tensor_lion(params, grads, moments, hyper)
    all_codes = torch.empty(values.numel(), dtype=torch.int8, device=values.device)
    all_scales = torch.empty(values.numel() // BLOCK, dtype=torch.float32, device=values.device)
    quantize_into(values, all_codes, all_scales)
    torch._foreach_copy_(codes, list(all_codes.split([c.numel() for c in codes])))
    torch._foreach_copy_(scales, list(all_scales.split([s.numel() for s in scales])))


def _one(hyper: LionHyper, index: int, count: int) -> LionHyper:
    """``hyper`` restricted to the tensor at ``index``."""
    keys = hyper.rounding_keys
    return LionHyper(
        **{
            **hyper.__dict__,
            "lr": hyper.lrs(count)[index],
            "rounding_keys": None if keys is None else [keys[index]],
        }
    )


@cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
