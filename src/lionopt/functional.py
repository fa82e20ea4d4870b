"""The functional Lion step, and the dispatch to its implementations.

``lion(params, grads, exp_avgs, ...)`` updates ``params`` and ``exp_avgs`` in place. It is what
``lionopt.Lion.step`` calls, and it is public for users who manage their own state.

Tensors are grouped by device and dtype; each group goes to one implementation:

- ``fused``: one compiled pass per group (C++ on CPU, Triton on CUDA), the default where it runs;
  on CPU, when every tensor suits the kernel, one C++ call (``kernels.cpu_dispatch``) does the
  checks and the step, with no Python work per tensor;
- ``foreach``: ``torch._foreach_*`` ops, the default elsewhere and under ``torch.compile``;
- the single-tensor reference loop (``foreach=False, fused=False``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace
from functools import cache
from operator import attrgetter

import torch
from torch import Tensor

from lionopt.distributed import sharded
from lionopt.kernels import cpu_dispatch
from lionopt.kernels._common import LionHyper
from lionopt.kernels.foreach import multi_tensor_lion
from lionopt.kernels.quantized import quantized_lion
from lionopt.kernels.reference import single_tensor_lion

__all__ = ["lion"]

_FUSED_BACKENDS = {"cpu": "lionopt.kernels.fused_cpu", "cuda": "lionopt.kernels.triton_lion"}
_ROUNDING_BACKENDS = {
    "cpu": "lionopt.kernels.fused_quant_cpu",
    "cuda": "lionopt.kernels.triton_quant",
}


def lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float | Tensor | Sequence[float],
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool = False,
    foreach: bool | None = None,
    fused: bool | None = None,
    cautious: bool = False,
    cautious_weight_decay: bool = False,
    exp_avg_scales: Sequence[Tensor | None] | None = None,
    rounding_keys: Sequence[int] | None = None,
) -> None:
    """One Lion step, in place: for each parameter θ with gradient g and momentum m,

    ``c = β1·m + (1−β1)·g;  θ ← θ·(1−lr·λ) − lr·sign(c);  m ← β2·m + (1−β2)·g``.

    ``lr`` is a float, a 0-dim Tensor, or one float per parameter. ``cautious`` masks the
    coordinates where sign(c) disagrees with g and rescales by 1/mean(mask) (clamped at 1e-3);
    ``cautious_weight_decay`` decays only where update·θ ≥ 0 (arXiv 2510.12402).

    8-bit momentum: ``exp_avgs[i]`` holds int8 codes and ``exp_avg_scales[i]`` the per-block
    scales (``lionopt.kernels.quantized``; None for an ordinary momentum). ``rounding_keys``:
    one 32-bit key per tensor (``lionopt.kernels.rounding.rounding_key(seed, step, index)``)
    to round bf16 parameters stochastically; None rounds to nearest.
    """
    if not len(params) == len(grads) == len(exp_avgs):
        raise ValueError(
            "params, grads and exp_avgs must have the same length, got "
            f"{len(params)}, {len(grads)} and {len(exp_avgs)}"
        )
    if fused and foreach:
        raise ValueError("`fused` and `foreach` cannot be `True` together.")
    if rounding_keys is not None and any(p.dtype == torch.float16 for p in params):
        raise ValueError("stochastic rounding is implemented for bfloat16 parameters, not float16")
    compiling = torch.compiler.is_compiling()
    if isinstance(lr, Tensor) and not compiling:
        lr = lr.item()
    hyper = LionHyper(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        maximize=maximize,
        cautious=cautious,
        cautious_weight_decay=cautious_weight_decay,
        rounding_keys=None if rounding_keys is None else list(rounding_keys),
    )
    if not params:
        return
    if sharded.any_dtensor(params, grads, exp_avgs):
        # FSDP2 / DTensor: every implementation runs on the local shards (never data_ptr() of
        # a DTensor); whole-tensor statistics are reduced over the mesh.
        sharded.sharded_lion(
            lion,
            params,
            grads,
            exp_avgs,
            hyper=hyper,
            foreach=foreach,
            fused=fused,
            exp_avg_scales=exp_avg_scales,
            rounding_keys=rounding_keys,
        )
        return
    if compiling and exp_avg_scales is None:
        # Inductor fuses the foreach ops itself; the compiled kernels are opaque to it.
        impl = single_tensor_lion if foreach is False else multi_tensor_lion
        impl(params, grads, exp_avgs, hyper)
        return
    if (
        fused is not False
        and foreach is not True
        and exp_avg_scales is None
        and rounding_keys is None
        and params[0].is_cpu
        and cpu_dispatch.lists_step(params, grads, exp_avgs, hyper)
    ):
        return  # one C++ call checked every tensor and ran the fused CPU kernel

    for (device_type, dtypes), (indices, group) in _group_by_device_and_dtype(
        params, grads, exp_avgs
    ).items():
        group_hyper = hyper if _is_scalar_lr(lr) else _with_lrs(hyper, [lr[i] for i in indices])
        if rounding_keys is not None:
            group_hyper = replace(group_hyper, rounding_keys=[rounding_keys[i] for i in indices])
        if dtypes[3] == torch.int8:  # 8-bit blockwise momentum
            if exp_avg_scales is None:
                raise ValueError("int8 exp_avgs (8-bit momentum) need their exp_avg_scales")
            scales = [exp_avg_scales[i] for i in indices]
            quantized_lion(*group, scales, group_hyper, foreach=foreach, fused=fused)
            continue
        if fused is not False and foreach is not True:
            rounds = rounding_keys is not None and dtypes[1] == torch.bfloat16
            backend = _fused_backend(device_type, explicit=bool(fused), rounding=rounds)
            supported = backend is not None and backend.supports(*group, group_hyper)
            if not rounds and backend is not None and not supported:
                # The rounding kernel also covers a few more dtype pairs (fp32 θ, bf16 m).
                other = _fused_backend(device_type, explicit=False, rounding=True)
                if other is not None and other.supports(*group, group_hyper):
                    backend, supported = other, True
            if supported:
                backend.lion_step(*group, group_hyper)
                continue
            if fused:
                _warn_once(
                    f"lionopt: fused=True is not supported for these {device_type} tensors "
                    "(dtype, layout or options); using the foreach path."
                )
        if foreach is False:
            single_tensor_lion(*group, group_hyper)
        else:
            multi_tensor_lion(*group, group_hyper)


def _is_scalar_lr(lr: object) -> bool:
    return isinstance(lr, (int, float, Tensor))


def _with_lrs(hyper: LionHyper, lrs: list[float]) -> LionHyper:
    return LionHyper(**{**hyper.__dict__, "lr": lrs})


def _group_by_device_and_dtype(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor]
) -> dict[tuple, tuple[list[int], tuple[list[Tensor], list[Tensor], list[Tensor]]]]:
    if all(_uniform(tensors, "dtype") for tensors in (params, grads, exp_avgs)) and _uniform(
        params, "device"
    ):
        p = params[0]
        key = (p.device.type, (p.device, p.dtype, grads[0].dtype, exp_avgs[0].dtype))
        return {key: (list(range(len(params))), (params, grads, exp_avgs))}
    groups: dict[tuple, tuple[list[int], tuple[list[Tensor], list[Tensor], list[Tensor]]]] = {}
    for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs)):
        key = (p.device.type, (p.device, p.dtype, g.dtype, m.dtype))
        indices, lists = groups.setdefault(key, ([], ([], [], [])))
        indices.append(i)
        for tensors, t in zip(lists, (p, g, m)):
            tensors.append(t)
    return groups


def _uniform(tensors: list[Tensor], attribute: str) -> bool:
    """Whether every tensor has the same ``attribute`` (the fast path of the grouping)."""
    return len(set(map(attrgetter(attribute), tensors))) == 1


def _fused_backend(device_type: str, explicit: bool, rounding: bool = False):
    """The fused-kernel module for a device type, or None where it cannot run here.

    ``rounding``: the group's bf16 weights are rounded stochastically (a kernel of its own).
    """
    module_name = (_ROUNDING_BACKENDS if rounding else _FUSED_BACKENDS).get(device_type)
    if module_name is None:
        return None
    backend = _import_backend(module_name)
    if backend is None or not backend.available():
        if explicit:
            _warn_once(
                f"lionopt: the fused {device_type} kernel is not available; using the foreach path."
            )
        return None
    return backend


@cache
def _import_backend(module_name: str):
    import importlib

    try:
        return importlib.import_module(module_name)
    except ImportError:
        return None


@cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
