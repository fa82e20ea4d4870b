"""On-demand health figures for Lion and Tiger, as a flat dict of floats for TensorBoard or W&B.

``lion_stats(optimizer)`` reads the parameters, their ``.grad`` and ``optimizer.state``; it adds
no work to ``step()`` and costs nothing unless called. Call it every N steps, e.g.::

    loss.backward()
    if step % 100 == 0:
        writer.add_scalars("lion", lionopt.diagnostics.lion_stats(opt), step)
    opt.step()

It makes one host sync per call (all reductions are stacked and read back together).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lionopt.kernels import dtensor
from lionopt.optim.base import as_float as _as_float
from lionopt.optim.lion import Lion
from lionopt.optim.tiger import Tiger

__all__ = ["lion_stats"]


def lion_stats(
    optimizer: Optimizer, *, after_step: bool = False, box_tol: float = 1e-3
) -> dict[str, float]:
    """Per-group figures of a ``Lion`` (or subclass, e.g. ``Signum``) or ``Tiger`` optimizer.

    Keys are ``"group{i}/<figure>"`` for each non-empty group i:

    - ``lr``: the group's lr now (for Tiger, the relative lr α);
    - ``weight_rms``: RMS over all the group's parameter values;
    - ``equilibrium_rms``: where decay balances a random walk of sign steps: √(lr/(2λ)) for
      Lion, lr/(2λ) for Tiger (its step is lr·RMS, so the fixed point of √(lr·RMS/(2λ)) =
      RMS). λ is the effective decay rate: λ/max_lr with ``decouple_lr``, 0 for Tiger's
      ``bias_or_gain`` groups. ``inf`` when λ = 0. With momentum, gradient noise gives a
      larger RMS than this (successive signs are correlated): read it as a scale.
    - ``box_max``: max|θ|·λ; the box |θ| ≤ 1/λ is invariant while lr·λ ≤ 1, so 1 means some
      coordinate is pinned at the box (0 when λ = 0);
    - ``box_share``: share of coordinates with |θ|·λ ≥ 1 − ``box_tol``;
    - ``sign_agreement``: share of coordinates, among parameters with a gradient, where the
      update direction c agrees in sign with the gradient g (sign(c)·g > 0; the mean of the
      Cautious mask). Which c is measured:

      * ``after_step=False`` (default; call between ``backward()`` and ``step()``): the
        direction the coming step will use, recomputed from the stored momentum and the
        current gradient: Lion c = β1·m + (1 − β1)·g; Tiger c = the momentum after this
        micro-step (β·m + (1 − β)/k·g on the first micro-step, m + (1 − β)/k·g later).
      * ``after_step=True`` (call after ``step()``, before the gradients are zeroed): the
        direction the step just used. For Lion it is recovered from the new momentum:
        c ∝ β1·m_new + (β2 − β1)·g (exact up to rounding; NaN if β2 = 0); for Tiger it is
        sign(m) itself (on an update micro-step, exactly the direction applied).

      With ``maximize`` the gradient is −g. For Cautious Lion it is the share of coordinates
      the mask keeps. NaN when no parameter of the group has a gradient.
    - ``nonfinite_grads``: number of NaN/±inf gradient values.
    """
    if not isinstance(optimizer, (Lion, Tiger)):
        raise TypeError(f"lion_stats expects a Lion or Tiger optimizer, got {type(optimizer)}")
    device = None
    pending: list[tuple[str, dict[str, Any], dict[str, Tensor]]] = []
    for index, group in enumerate(optimizer.param_groups):
        params = group["params"]
        if not params:
            continue
        device = device or params[0].device
        sums = _group_sums(optimizer, group, _decay_rate(group), box_tol, after_step)
        pending.append((f"group{index}/", group, sums))

    if not pending:
        return {}
    flat = [t.to(device, torch.float64) for _, _, sums in pending for t in sums.values()]
    values = iter(torch.stack(flat).tolist())
    stats: dict[str, float] = {}
    for prefix, group, sums in pending:
        figures = dict(zip(sums, values, strict=False))
        lr = _as_float(group["lr"])
        decay = _decay_rate(group)
        numel = sum(p.numel() for p in group["params"])
        stats[prefix + "lr"] = lr
        stats[prefix + "weight_rms"] = math.sqrt(figures["square_sum"] / max(numel, 1))
        stats[prefix + "equilibrium_rms"] = _equilibrium(group, lr, decay)
        stats[prefix + "box_max"] = figures["abs_max"] * decay
        stats[prefix + "box_share"] = figures["at_box"] / max(numel, 1)
        graded = figures["grad_numel"]
        stats[prefix + "sign_agreement"] = figures["agree"] / graded if graded else math.nan
        stats[prefix + "nonfinite_grads"] = figures["nonfinite"]
    return stats


def _decay_rate(group: dict[str, Any]) -> float:
    """The decay rate λ such that one step multiplies θ by 1 − lr·λ."""
    if group.get("bias_or_gain"):
        return 0.0
    weight_decay = float(group["weight_decay"])
    if group.get("decouple_lr") and weight_decay:
        return weight_decay / float(group["max_lr"])
    return weight_decay


def _equilibrium(group: dict[str, Any], lr: float, decay: float) -> float:
    if decay == 0:
        return math.inf
    if "accum_steps" in group:  # Tiger: step lr·RMS, so RMS = √(lr·RMS/(2λ)) gives lr/(2λ)
        return lr / (2 * decay)
    return math.sqrt(lr / (2 * decay))


def _direction(
    optimizer: Optimizer, group: dict[str, Any], p: Tensor, after_step: bool, sharded: bool = False
) -> Tensor:
    """The update direction c (up to a positive factor) for parameter ``p``."""
    g = -p.grad if group.get("maximize") else p.grad
    m = optimizer.state.get(p, {}).get("exp_avg")
    if sharded:  # local shards (an 8-bit momentum's codes are the shard's already)
        g, m = dtensor.local(g), None if m is None else dtensor.local(m)
    if m is None:
        return g
    g = g.to(m.dtype)
    if "accum_steps" in group:  # Tiger
        if after_step:
            return m
        share = (1 - group["beta"]) / group["accum_steps"]
        beta = group["beta"] if group["micro_step"] == 0 else 1.0
        return m * beta + g * share
    beta1, beta2 = group["betas"]
    if after_step:
        if beta2 == 0:
            return torch.full_like(m, math.nan)
        return m * beta1 + g * (beta2 - beta1)
    return m * beta1 + g * (1 - beta1)


def _group_sums(
    optimizer: Optimizer, group: dict[str, Any], decay: float, box_tol: float, after_step: bool
) -> dict[str, Tensor]:
    """0-dim float64 tensors on the parameters' device; the caller reads them in one sync.

    DTensor parameters (FSDP2): the figures of each local shard, reduced over the mesh (sums
    summed, the max maxed), so they equal the unsharded figures.
    """
    f64 = torch.float64
    params = [p for p in group["params"] if p.numel()]
    sharded = dtensor.any_dtensor(params)
    device = dtensor.local(group["params"][0]).device
    zero = torch.zeros((), dtype=f64, device=device)
    rows = []  # per parameter: square_sum, abs_max, at_box, agree, nonfinite, grad_numel
    for p in params:
        theta = dtensor.local(p.detach())
        row = [
            torch.linalg.vector_norm(theta, dtype=f64).square(),
            theta.abs().amax().to(f64) if theta.numel() else zero,
            (theta.abs() * decay >= 1 - box_tol).sum(dtype=f64) if decay > 0 else zero,
        ]
        if p.grad is None:
            rows.append(torch.stack([*row, zero, zero, zero]))
            continue
        g = dtensor.local(-p.grad if group.get("maximize") else p.grad)
        c = dtensor.local(_direction(optimizer, group, p, after_step, sharded))
        row.append((torch.sign(c) * g.to(c.dtype) > 0).sum(dtype=f64))
        row.append((~torch.isfinite(g)).sum(dtype=f64))
        row.append(zero + g.numel())
        rows.append(torch.stack([t.to(device) for t in row]))
    figures = torch.stack(rows) if rows else torch.zeros((1, 6), dtype=f64, device=device)
    if sharded:
        sums = dtensor.reduce_rows(figures[:, [0, 2, 3, 4, 5]], params, "sum")
        maxima = dtensor.reduce_rows(figures[:, [1]], params, "max")
        figures = torch.cat([sums[:, :1], maxima, sums[:, 1:]], dim=1)
    totals = figures.sum(dim=0)
    return {
        "square_sum": totals[0],
        "abs_max": figures[:, 1].max(),
        "at_box": totals[2],
        "agree": totals[3],
        "nonfinite": totals[4],
        "grad_numel": totals[5],
    }


def _total(values: list[Tensor]) -> Tensor:
    return torch.stack([t.to(values[0].device) for t in values]).sum()
