"""``lionopt.Tiger``: Su Jianlin's "tight-fisted optimizer", Lion with β1 = β2 and a relative lr.

References: kexue.fm/archives/9512 (the design), github.com/bojone/tiger (the reference code),
kexue.fm/archives/8634 (gradient accumulation hidden in the momentum).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lionopt import functional
from lionopt.hparams import classify_parameters
from lionopt.kernels.group import LocalStats
from lionopt.kernels.hyper import is_low_precision
from lionopt.kernels.rounding import store_param
from lionopt.optim.base import (
    LionFamily,
    ParamsT,
    check_impl_flags,
    check_lr,
    check_memory_options,
    check_weight_decay,
    is_finite_at_least,
    real_number,
)
from lionopt.optim.base import as_float as _as_float
from lionopt.state.int8 import dequantize, quantize_into

__all__ = ["Tiger", "tiger_param_groups"]


class Tiger(LionFamily):
    r"""Tiger (Su 2023): sign momentum with β1 = β2 = β and an lr relative to the weight RMS.

    For each parameter θ with gradient g and momentum m (``state["exp_avg"]``)::

        m ← β·m + (1 − β)·g
        θ ← θ − η_t·(sign(m) + λ·θ),     η_t = lr·max(RMS(θ), rms_floor)

    This is ``Lion(betas=(β, β))`` with a per-tensor lr η_t (with β1 = β2, Lion's direction
    β·m + (1 − β)·g is the new momentum), and the update goes through
    ``lionopt.functional.lion``, so Tiger runs on the loop, foreach and fused paths. ``lr`` is
    the relative change per step (α in the blog): 1e-3 changes each weight matrix by about a
    thousandth of its RMS per step. RMS(θ) is taken before the step.

    Parameter groups may set these flags (``tiger_param_groups(model)`` sets them for you):

    - ``embedding=True``: RMS per row (over the last dim) of an embedding table, so each row
      moves relative to its own scale;
    - ``bias_or_gain=True``: biases and norm gains: η_t = 0.5·lr (no RMS factor) and λ = 0;
    - ``init_centre``: where the non-finite guard shrinks θ to: 1.0 for norm gains, 0.0 (the
      default) otherwise.

    The RMS floor (``rms_floor``, default 1e-3) lets zero-initialised tensors move: their
    steps are lr·rms_floor until the RMS passes the floor (~1/lr steps when the signs persist),
    then η_t follows the RMS. The reference code (github.com/bojone/tiger) has no floor, so a
    zero-initialised matrix never moves there. The floor is absolute: set it below the init
    scale of your smallest weight matrices (1e-3 suits inits of std 0.01 and more).

    Gradient accumulation without an extra buffer (``accum_steps=k``, call ``step()`` after
    every micro-batch's ``backward()`` and zero the grads after each): the first micro-step
    decays m by β, every micro-step adds (1 − β)/k·g, and only the k-th applies the update, so
    k micro-steps equal one step on the mean gradient. The micro-step counter is stored in each
    group (``group["micro_step"]``) and saved with the state dict.

    Non-finite guard: when a tensor's gradient holds a NaN or ±inf on a micro-step, its
    momentum is left as it is and θ shrinks toward its init centre c:
    θ ← (θ − c)·shrink_ratio + c (so a run that keeps producing NaNs shrinks its way back to a
    trainable scale instead of being destroyed).

    Args:
        params: parameters or parameter-group dicts.
        lr: relative lr α (the reference default 1e-3).
        beta: momentum β: 0.965 for language models (the default), 0.945 for vision.
        weight_decay: decoupled decay λ; the step multiplies θ by 1 − η_t·λ. As in the
            reference code the default is 0.01.
        accum_steps: micro-steps per update.
        rms_floor: lower bound on RMS(θ) in η_t.
        shrink_ratio: the non-finite guard's shrink factor.
        foreach, fused: the implementation of the update, as in ``lionopt.Lion``.
        momentum_dtype, stochastic_rounding, seed: as in ``lionopt.Lion`` (bf16 or 8-bit
            momentum; the math is fp32 and each micro-step stores the momentum once).
        step_in_backward: gradient release, as in ``lionopt.Lion``: each micro-step runs in
            backward, and ``step()`` advances the micro-step counter.
    """

    GROUP_DEFAULTS: ClassVar[dict[str, Any]] = {
        "momentum_dtype": None,
        "stochastic_rounding": False,
        "seed": 0,
    }
    SKIP_EMPTY = True  # an empty tensor has nothing to update (and no RMS)

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        beta: float = 0.965,
        weight_decay: float = 0.01,
        *,
        accum_steps: int = 1,
        rms_floor: float = 1e-3,
        shrink_ratio: float = 0.99,
        foreach: bool | None = None,
        fused: bool | None = None,
        momentum_dtype: torch.dtype | str | None = None,
        stochastic_rounding: bool = False,
        seed: int = 0,
        step_in_backward: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            beta=beta,
            weight_decay=weight_decay,
            accum_steps=accum_steps,
            rms_floor=rms_floor,
            shrink_ratio=shrink_ratio,
            embedding=False,
            bias_or_gain=False,
            init_centre=0.0,
            foreach=foreach,
            fused=fused,
            momentum_dtype=momentum_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            micro_step=0,
        )
        super().__init__(params, defaults, step_in_backward=step_in_backward)

    @classmethod
    def validate_group(cls, group: dict[str, Any]) -> None:
        _validate_group(group)

    def _released_group(self, group: dict[str, Any]) -> None:
        """Under gradient release the micro-steps ran in backward: advance the counter."""
        last = group["micro_step"] >= group["accum_steps"] - 1
        group["micro_step"] = 0 if last else group["micro_step"] + 1

    def _whole_tensor_rule(self, group: dict[str, Any]) -> str | None:
        return "Tiger"

    def _step_group(self, group: dict[str, Any], params: list[Tensor] | None = None) -> None:
        """One micro-step of ``group``; the update is applied on every ``accum_steps``-th call.

        ``params`` (a subset) steps only those parameters and does not advance the group's
        micro-step counter.
        """
        micro_step = group["micro_step"]
        last = micro_step >= group["accum_steps"] - 1
        if params is None:
            group["micro_step"] = 0 if last else micro_step + 1
        stepped: list[Tensor] = []
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        scales: list[Tensor | None] = []
        self._init_group(group, stepped, grads, exp_avgs, scales, only=params)
        if stepped:
            self._micro_step(
                group, stepped, grads, exp_avgs, scales, first=micro_step == 0, last=last
            )

    def _micro_step(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        scales: list[Tensor | None],
        *,
        first: bool,
        last: bool,
    ) -> None:
        beta, k = group["beta"], group["accum_steps"]
        use_foreach = group["foreach"] is not False or group["fused"] is True
        dense_rms = last and not group["bias_or_gain"] and not group["embedding"]
        stats = functional.stats_for(params)
        # One host sync: the inf-norm of every gradient (non-finite iff the gradient is) and,
        # where the update needs it, the RMS of every parameter.
        figures = stats.norms(grads, math.inf)
        if dense_rms:
            # fp32 accumulation for low-precision tensors, float64 kept as it is.
            wide = None if any(p.dtype == torch.float64 for p in params) else torch.float32
            figures += stats.rms(params, dtype=wide)
        host = torch.float32 if params[0].device.type == "mps" else torch.float64
        values = torch.stack([f.to(params[0].device, host) for f in figures]).tolist()
        finite = [math.isfinite(v) for v in values[: len(params)]]
        rms = values[len(params) :]

        if not all(finite):
            bad = [p for p, ok in zip(params, finite, strict=True) if not ok]
            _shrink(bad, group["shrink_ratio"], group["init_centre"], use_foreach)
            keep = [i for i, ok in enumerate(finite) if ok]
            if not keep:
                return
            params, grads, exp_avgs, scales = (
                [t[i] for i in keep] for t in (params, grads, exp_avgs, scales)
            )
            rms = [rms[i] for i in keep] if rms else rms

        share = (1 - beta) / k
        if not last:
            _accumulate(
                params, exp_avgs, scales, grads, beta if first else None, share, use_foreach
            )
            return
        keys = self._rounding_keys(group, params)
        lr = _as_float(group["lr"])
        weight_decay = group["weight_decay"]
        if group["bias_or_gain"]:
            lrs, weight_decay = 0.5 * lr, 0.0
        elif group["embedding"]:
            for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs, strict=True)):
                key = None if keys is None else keys[i]
                _embedding_update(p, g, m, scales[i], group, first=first, key=key, stats=stats)
            return
        else:
            lrs = [lr * max(value, group["rms_floor"]) for value in rms]
        if first:  # a window of one micro-step (k = 1)
            # With β1 = β2 = β, Lion's direction β·m + (1 − β)·g is the new momentum.
            betas = (beta, beta)
        else:
            # m already holds the decayed sum; Lion with β1 = β2 = 1 steps along sign(m) and
            # leaves m as it is.
            _accumulate(params, exp_avgs, scales, grads, None, share, use_foreach)
            betas = (1.0, 1.0)
        functional.lion(
            params,
            grads,
            exp_avgs,
            lr=lrs,
            beta1=betas[0],
            beta2=betas[1],
            weight_decay=weight_decay,
            foreach=group["foreach"],
            fused=group["fused"],
            exp_avg_scales=scales if any(s is not None for s in scales) else None,
            rounding_keys=keys,
        )


def _momentum_views(
    params: list[Tensor], exp_avgs: list[Tensor], scales: list[Tensor | None]
) -> tuple[list[Tensor], list[tuple]]:
    """fp32 working copies of low-precision and 8-bit momenta (others: the tensors themselves),
    and what ``_store_momenta`` needs to write them back."""
    views, stores = [], []
    for p, m, scale in zip(params, exp_avgs, scales, strict=True):
        if scale is not None:
            values = dequantize(m, scale)
            views.append(values[: p.numel()].view(p.shape))
            stores.append((values, m, scale))
        elif is_low_precision(m):
            views.append(m.float())
            stores.append((views[-1], m, None))
        else:
            views.append(m)
    return views, stores


def _store_momenta(stores: list[tuple]) -> None:
    for values, m, scale in stores:
        if scale is not None:
            quantize_into(values, m, scale)
        else:
            m.copy_(values)


def _accumulate(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    scales: list[Tensor | None],
    grads: list[Tensor],
    beta: float | None,
    share: float,
    foreach: bool,
) -> None:
    """m ← β·m + share·g (β = None: m ← m + share·g).

    In fp32 for bf16 and 8-bit momenta, stored once (rounded to nearest, or requantised).
    """
    moms, stores = _momentum_views(params, exp_avgs, scales)
    grads = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, moms, strict=True)]
    if foreach:
        if beta is not None:
            torch._foreach_mul_(moms, beta)
        torch._foreach_add_(moms, grads, alpha=share)
    else:
        for m, g in zip(moms, grads, strict=True):
            if beta is not None:
                m.mul_(beta)
            m.add_(g, alpha=share)
    _store_momenta(stores)


def _shrink(params: list[Tensor], ratio: float, centre: float, foreach: bool) -> None:
    """θ ← (θ − centre)·ratio + centre; in fp32 for bf16/fp16 weights, stored once."""
    thetas = [p.float() if is_low_precision(p) else p for p in params]
    if foreach:
        if centre:
            torch._foreach_sub_(thetas, centre)
        torch._foreach_mul_(thetas, ratio)
        if centre:
            torch._foreach_add_(thetas, centre)
    else:
        for theta in thetas:
            theta.sub_(centre).mul_(ratio).add_(centre)
    for p, theta in zip(params, thetas, strict=True):
        if theta is not p:
            p.copy_(theta)


def _embedding_update(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    scale: Tensor | None,
    group: dict[str, Any],
    *,
    first: bool,
    key: int | None,
    stats: LocalStats,
) -> None:
    """The last micro-step for an embedding table: the same update with an lr per row.

    A per-row lr is a tensor, which the functional Lion step does not take, hence this path.
    The math is fp32 for low-precision weights and low-precision or 8-bit momenta, stored
    once (bf16 weights rounded stochastically when ``key`` is given), as in Lion.
    """
    beta = group["beta"]
    (mom,), stores = _momentum_views([p], [m], [scale])
    low_precision = is_low_precision(p) or bool(stores)
    theta = p.float() if low_precision else p
    lr_rows = stats.row_rms(theta).clamp_(min=group["rms_floor"]).mul_(_as_float(group["lr"]))
    if first:
        mom.mul_(beta)
    mom.add_(g.to(mom.dtype), alpha=(1 - beta) / group["accum_steps"])
    theta.mul_(1 - lr_rows * group["weight_decay"]).addcmul_(lr_rows, torch.sign(mom), value=-1)
    if low_precision:
        store_param(p, theta, key)
    _store_momenta(stores)


def tiger_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Parameter groups for Tiger with the flags set (see ``lionopt.hparams.classify_parameters``).

    Weight matrices get the plain group; ``nn.Embedding`` / ``nn.EmbeddingBag`` weights
    ``embedding=True``; biases and other parameters with < 2 dims ``bias_or_gain=True``;
    normalisation gains ``bias_or_gain=True, init_centre=1.0``. Empty groups are left out.
    Hyperparameters come from the constructor; add keys to a group to override them.
    """
    kinds = classify_parameters(model)
    groups = [
        {"name": "weight", "params": kinds["weight"]},
        {"name": "embedding", "params": kinds["embedding"], "embedding": True},
        {"name": "bias", "params": kinds["bias"], "bias_or_gain": True},
        {"name": "gain", "params": kinds["gain"], "bias_or_gain": True, "init_centre": 1.0},
    ]
    return [group for group in groups if group["params"]]


def _validate_group(group: dict[str, Any]) -> None:
    """Raise ValueError, in torch.optim's wording, for a hyperparameter Tiger cannot use."""
    check_lr(group["lr"])
    beta = group["beta"]
    if not 0.0 <= real_number("beta value", beta) < 1.0:
        raise ValueError(f"Invalid beta value: {beta}")
    check_weight_decay(group["weight_decay"])
    accum_steps = group["accum_steps"]
    if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"Invalid accum_steps value: {accum_steps!r}")
    rms_floor = group["rms_floor"]
    if not is_finite_at_least(real_number("rms_floor value", rms_floor), 0.0) or rms_floor == 0:
        raise ValueError(f"Invalid rms_floor value: {rms_floor}")
    shrink_ratio = group["shrink_ratio"]
    if not 0.0 <= real_number("shrink_ratio value", shrink_ratio) <= 1.0:
        raise ValueError(f"Invalid shrink_ratio value: {shrink_ratio}")
    if not math.isfinite(real_number("init_centre value", group["init_centre"])):
        raise ValueError(f"Invalid init_centre value: {group['init_centre']}")
    for flag in ("embedding", "bias_or_gain"):
        if not isinstance(group[flag], bool):
            raise ValueError(f"Invalid {flag} value: {group[flag]!r}; expected a bool")
    if group["embedding"] and group["bias_or_gain"]:
        raise ValueError("A group cannot be both `embedding` and `bias_or_gain`")
    check_memory_options(group)
    check_impl_flags(group)
