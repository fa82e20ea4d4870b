"""``lionopt.Lion``: the Lion optimizer as a drop-in ``torch.optim.Optimizer``.

The class owns parameter groups, state and validation (through ``optim.base.LionFamily``); the
math is ``lionopt.functional.lion``, whose reference body is ``lionopt.kernels.reference``. State
per parameter is one tensor, ``exp_avg`` (the momentum), the same key the official code and the
common PyTorch ports use, so checkpoints move both ways.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lionopt import functional
from lionopt.optim.base import (
    LionFamily,
    ParamsT,
    SparseGradientError,
    as_float,
    check_bools,
    check_impl_flags,
    check_lr,
    check_memory_options,
    check_weight_decay,
    is_finite_at_least,
    lion_hyper,
    real_number,
    update_rule,
)
from lionopt.state.formats import resolve_format

__all__ = ["Lion", "ParamsT", "SparseGradientError"]


class Lion(LionFamily):
    r"""Lion: EvoLved Sign Momentum (Chen et al. 2023, arXiv 2302.06675).

    For each parameter θ with gradient g and momentum m (``state["exp_avg"]``)::

        c = β1·m + (1 − β1)·g
        θ ← θ·(1 − lr·λ) − lr·sign(c)
        m ← β2·m + (1 − β2)·g

    Args:
        params: parameters or parameter-group dicts.
        lr: learning rate, a float or a 0-dim Tensor (3-10x smaller than AdamW's).
        betas: (β1, β2): interpolation for the update direction, and momentum decay.
        weight_decay: decoupled weight decay λ (3-10x larger than AdamW's); the step
            multiplies θ by 1 − lr·λ.
        maximize: maximise the objective instead of minimising it.
        foreach: use the ``torch._foreach_*`` implementation.
        fused: use the fused kernel (C++ on CPU, Triton on CUDA). With both ``None`` (the
            default) the fastest implementation that supports the tensors is used.
        cautious: Cautious Lion (arXiv 2411.16085): drop the coordinates where sign(c)
            disagrees with the gradient, and rescale by 1/mean(mask) (mean clamped at 1e-3).
        cautious_weight_decay: decay only where update·θ ≥ 0, i.e. where the update also pulls θ
            toward 0 or one of them is 0 (Algorithm 1 of arXiv 2510.12402).
        decouple_lr: fully decoupled weight decay: the per-step decay is λ·lr_t/max_lr, so it
            follows the schedule but not the lr's scale.
        max_lr: the divisor for ``decouple_lr``; defaults to each group's lr when the group is
            added. Stored per group, so it is saved and restored with the state dict.
        momentum_dtype: storage of the momentum: None (the parameter's dtype, as the official
            code), ``torch.float32``, ``torch.bfloat16``, or ``"int8"``: 8-bit blockwise
            (256-element blocks, fp32 absmax scale each, 1.016 bytes/param; parameters under
            4096 elements stay fp32; see ``lionopt.state.int8``). Also "fp32", "bf16",
            "8bit". The math is fp32 in every case. It is a property of this optimizer, not of
            a checkpoint: ``load_state_dict`` converts the loaded momentum to it.
        stochastic_rounding: round bf16 parameters stochastically (unbiased) after each step
            instead of to nearest, so steps smaller than half a bf16 ulp still move the weights
            on average. The bits come from a counter-based hash of (seed, step, index): every
            implementation draws the same bits, and a resumed run draws them again (each
            parameter's ``state["step"]`` counts its steps). fp32 parameters are unaffected;
            fp16 parameters are not supported.
        seed: the seed of stochastic rounding (saved with the group; default 0, so runs and
            data-parallel ranks round identically).
        step_in_backward: gradient release: step each parameter inside the backward pass as
            soon as its gradient is accumulated, and free the gradient (``step()`` then only
            advances counters). Bitwise the same steps; no closures, GradScaler or global-norm
            clipping; ``accumulate_grads()`` for micro-batches. See ``lionopt.optim.release``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        cautious: bool = False,
        cautious_weight_decay: bool = False,
        decouple_lr: bool = False,
        max_lr: float | None = None,
        momentum_dtype: torch.dtype | str | None = None,
        stochastic_rounding: bool = False,
        seed: int = 0,
        step_in_backward: bool = False,
    ) -> None:
        if fused and foreach:
            raise ValueError("`fused` and `foreach` cannot be `True` together.")
        defaults = dict(
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            cautious=cautious,
            cautious_weight_decay=cautious_weight_decay,
            decouple_lr=decouple_lr,
            max_lr=max_lr,
            momentum_dtype=momentum_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
        )
        super().__init__(params, defaults, step_in_backward=step_in_backward)

    GROUP_DEFAULTS: ClassVar[dict[str, Any]] = {
        "maximize": False,
        "foreach": None,
        "fused": None,
        "cautious": False,
        "cautious_weight_decay": False,
        "decouple_lr": False,
        "max_lr": None,
        "momentum_dtype": None,
        "stochastic_rounding": False,
        "seed": 0,
    }

    @classmethod
    def validate_group(cls, group: dict[str, Any]) -> None:
        """Raise ValueError, in torch.optim's wording, for a hyperparameter Lion cannot use."""
        check_lr(group["lr"])
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2)")
        for index, beta in enumerate(betas):
            if not 0.0 <= real_number(f"beta parameter at index {index}", beta) < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
        check_weight_decay(group["weight_decay"])
        max_lr = group.get("max_lr")
        if max_lr is not None:
            value = real_number("max_lr value", max_lr)
            if not is_finite_at_least(value, 0.0) or value == 0.0:
                raise ValueError(f"Invalid max_lr value: {max_lr}")
        check_memory_options(group)
        check_bools(group, ("maximize", "cautious", "cautious_weight_decay", "decouple_lr"))
        check_impl_flags(group)

    def _group_added(self, group: dict[str, Any]) -> None:
        if group["decouple_lr"] and group["max_lr"] is None:
            group["max_lr"] = as_float(group["lr"])

    def _whole_tensor_rule(self, group: dict[str, Any]) -> str | None:
        return "Cautious Lion" if group["cautious"] else None

    def _step_group(self, group: dict[str, Any], params: list[Tensor] | None = None) -> None:
        """One step of ``group`` (or only of ``params``).

        A whole-group step on CPU (plain or 8-bit momentum) first tries the C++ group step
        (``kernels.cpu.dispatch.GroupStepCache``): one call, no Python work per tensor.
        """
        fmt = resolve_format(group["momentum_dtype"])
        fast = None
        # The C++ group step computes every statistic locally: not for mesh-reducing stats.
        if params is None and functional.stats_for(group["params"]).local:
            fast = self._cache.ready(
                group["params"],
                self.state,
                fmt=fmt,
                rounding=group["stochastic_rounding"],
                foreach=group["foreach"],
                fused=group["fused"],
            )
            if fast and self._cache.try_step(
                group, group["params"], self.state, fmt, lion_hyper(group)
            ):
                return
        stepped: list[Tensor] = []
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        scales: list[Tensor | None] = []
        self._init_group(group, stepped, grads, exp_avgs, scales, only=params)
        if fast is not None:
            self._cache.remember(group, group["params"], self.state)
        if not stepped:
            return
        functional.lion(
            stepped,
            grads,
            exp_avgs,
            lr=group["lr"],
            **update_rule(group),
            foreach=group["foreach"],
            fused=group["fused"],
            exp_avg_scales=scales if any(s is not None for s in scales) else None,
            rounding_keys=self._rounding_keys(group, stepped),
        )
