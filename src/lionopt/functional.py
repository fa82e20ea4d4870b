"""The functional Lion step, and the dispatch to its implementations.

``lion(params, grads, exp_avgs, ...)`` updates ``params`` and ``exp_avgs`` in place. It is what
``lionopt.Lion.step`` calls, and it is public for users who manage their own state.

It does one thing: it resolves the implementation once (``resolve_impl``), cuts the tensors into
``TensorGroup``s of one device, dtype triple and momentum kind (``group_tensors``), and steps
each group with one of three bodies:

- ``fused``: a compiled kernel from ``lionopt.kernels.registry`` (C++ on CPU, Triton on CUDA),
  the default where one supports the group; otherwise the group falls back to foreach (with one
  warning when ``fused=True`` was asked for);
- ``foreach``: ``kernels.foreach.multi_tensor`` (``torch._foreach_*`` ops), the default
  elsewhere; under ``torch.compile`` the fused CPU step is a custom op
  (``lionopt::lion_step_``) that the compiled graph keeps, and other groups use foreach;
- ``single``: ``kernels.reference.single_tensor``, the per-tensor reference loop.

``group_tensors`` is the one place where the lists become groups: a distributed caller can
replace it (e.g. map DTensors to their local shards, give the groups a mesh-reducing
``stats`` and mark them not ``fusable``) without touching the bodies.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

import torch
from torch import Tensor

from lionopt.kernels import dtensor, registry
from lionopt.kernels.foreach import multi_tensor
from lionopt.kernels.group import LOCAL_STATS, LocalStats, TensorGroup
from lionopt.kernels.hyper import LionHyper
from lionopt.kernels.reference import single_tensor
from lionopt.state.formats import INT8_KIND, PLAIN_KIND

__all__ = ["group_tensors", "lion", "resolve_impl", "stats_for"]

SINGLE, MULTI, FUSED, COMPILED = "single", "multi", "fused", "compiled"


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
    scales (``lionopt.state.int8``; None for an ordinary momentum). ``rounding_keys``:
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
    if exp_avg_scales is not None and len(exp_avg_scales) != len(params):
        raise ValueError(
            f"exp_avg_scales must have one entry per parameter, got {len(exp_avg_scales)}"
        )
    compiling = torch.compiler.is_compiling()
    if isinstance(lr, Tensor) and not compiling:
        lr = lr.item()
    if compiling and isinstance(lr, float) and foreach is not False:
        lr = _traced_lr(lr)
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
    finish = None
    if dtensor.any_dtensor(params, grads, exp_avgs):  # FSDP2: steps run on the local shards
        dtensor.check_group(
            params, grads, exp_avgs, exp_avg_scales, rounding=rounding_keys is not None
        )
        params, hyper, finish = dtensor.stage_rounding(params, hyper)
    impl = resolve_impl(foreach, fused, compiling)
    fallback = SINGLE if foreach is False else MULTI
    if impl == FUSED and dtensor.any_wrapper(params, grads, exp_avgs):
        impl = fallback  # a wrapper subclass: torch ops only, never its raw pointers
        if fused:
            registry.warn_once(
                "lionopt: fused=True is not supported for tensor subclasses (their data_ptr() "
                "is not their data); using the foreach path."
            )
    count = len(params)
    for group in group_tensors(params, grads, exp_avgs, exp_avg_scales):
        group_hyper = hyper.subset(group.indices, count) if len(group) != count else hyper
        step_group(group, group_hyper, impl, fallback=fallback, explicit=bool(fused))
    if finish is not None:
        finish()


def _traced_lr(lr: float) -> Tensor:
    """A float lr as a 0-dim float64 tensor, so that ``torch.compile`` need not recompile per lr.

    Dynamo turns a float that changed between calls into a graph input, but only if every use
    is an op it can rewrite to take a tensor (``aten.mul`` with a scalar is one; the foreach
    ops' scalar arguments are not). Multiplying a constant tensor by the float is such a use:
    after one recompile the lr is an input, as for torch's AdamW. The math stays that of a
    Python float (float64).
    """
    return torch.ones((), dtype=torch.float64) * lr


def resolve_impl(foreach: bool | None, fused: bool | None, compiling: bool = False) -> str:
    """``"single"``, ``"multi"``, ``"fused"`` or ``"compiled"`` from the tri-state flags
    (torch's semantics).

    Under ``torch.compile`` only backends with a traceable step (a custom op) can be fused
    (``"compiled"``); groups they do not take use foreach, which Inductor fuses itself.
    """
    if foreach is False and fused is False:
        return SINGLE
    if foreach or fused is False:
        return MULTI
    return COMPILED if compiling else FUSED


def step_group(
    group: TensorGroup,
    hyper: LionHyper,
    impl: str,
    *,
    fallback: str = MULTI,
    explicit: bool = False,
) -> None:
    """Step one group with ``impl``; a group no fused backend takes goes to ``fallback``."""
    if impl == COMPILED:
        if group.fusable and group.stats.local and registry.compiled_step(group, hyper):
            return
        impl = MULTI
    if impl == FUSED:
        fusable = (
            group.fusable
            and (group.stats.local or not hyper.cautious)
            # a DTensor's local shard may itself be a wrapper subclass (e.g. float8)
            and not dtensor.any_wrapper(group.params, group.grads, group.momenta)
        )
        backend = registry.select(group, hyper, explicit=explicit) if fusable else None
        if backend is not None:
            backend.step(group, hyper)
            return
        impl = fallback
    if impl == SINGLE:
        single_tensor(group, hyper)
    else:
        multi_tensor(group, hyper)


def group_tensors(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_scales: Sequence[Tensor | None] | None = None,
) -> list[TensorGroup]:
    """Cut parallel lists into ``TensorGroup``s of one device, dtype triple and momentum kind.

    The one place where lists become groups (see the module docstring). A momentum is 8-bit
    where ``exp_avg_scales[i]`` is a tensor.
    """
    if exp_avg_scales is not None and all(s is None for s in exp_avg_scales):
        exp_avg_scales = None
    if dtensor.any_dtensor(params, grads, exp_avgs):
        return dtensor.group_tensors(params, grads, exp_avgs, exp_avg_scales)
    if (
        exp_avg_scales is None
        and exp_avgs[0].dtype != torch.int8
        and _uniform(params, "device")
        and all(_uniform(tensors, "dtype") for tensors in (params, grads, exp_avgs))
    ):
        indices = list(range(len(params)))
        return [TensorGroup(params, grads, exp_avgs, PLAIN_KIND, None, indices, stats_for(params))]
    groups: dict[tuple, TensorGroup] = {}
    for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs)):
        scale = None if exp_avg_scales is None else exp_avg_scales[i]
        kind = PLAIN_KIND if scale is None else INT8_KIND
        if kind == PLAIN_KIND and m.dtype == torch.int8:
            raise ValueError("int8 exp_avgs (8-bit momentum) need their exp_avg_scales")
        key = (p.device, p.dtype, g.dtype, m.dtype, kind)
        group = groups.get(key)
        if group is None:
            group = groups[key] = TensorGroup(
                [], [], [], kind, None if scale is None else [], [], stats_for((p,))
            )
        group.params.append(p)
        group.grads.append(g)
        group.momenta.append(m)
        group.indices.append(i)
        if scale is not None:
            group.scales.append(scale)
    return list(groups.values())


def stats_for(params: Sequence[Tensor]) -> LocalStats:
    """The statistics object for these parameters: where whole-tensor figures are computed.

    ``LocalStats`` (each tensor is whole in this process). ``group_tensors`` gives it to every
    group, and Tiger and the diagnostics ask for it, so a sharded setup changes this one
    function to return an implementation that reduces over the mesh: ``MeshStats`` for lists
    holding DTensors (FSDP2).
    """
    if dtensor.any_dtensor(params):
        return dtensor.MeshStats()
    return LOCAL_STATS


def _uniform(tensors: list[Tensor], attribute: str) -> bool:
    """Whether every tensor has the same ``attribute`` (the fast path of the grouping)."""
    return len(set(map(attrgetter(attribute), tensors))) == 1
