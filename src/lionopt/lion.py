"""``lionopt.Lion``: the Lion optimizer as a drop-in ``torch.optim.Optimizer``.

The class owns parameter groups, state and validation; the math is in
``lionopt.functional.lion``. State per parameter is one tensor, ``exp_avg`` (the momentum), the
same key the official code and the common PyTorch ports use, so checkpoints move both ways.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lionopt.distributed import guards, sharded
from lionopt.functional import lion
from lionopt.kernels import cpu_dispatch
from lionopt.kernels._common import LionHyper
from lionopt.kernels.quantized import (
    convert_loaded_state,
    convert_momentum,
    normalize_momentum_dtype,
    padded_numel,
    remember_loaded_state,
)
from lionopt.kernels.rounding import rounding_key

__all__ = ["Lion"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]

_GROUP_DEFAULTS = {
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


class SparseGradientError(RuntimeError, ValueError):
    """Lion got a sparse gradient, which it does not support."""


class Lion(Optimizer):
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
            4096 elements stay fp32; see ``lionopt.kernels.quantized``). Also "fp32", "bf16",
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
            momentum_dtype=normalize_momentum_dtype(momentum_dtype),
            stochastic_rounding=stochastic_rounding,
            seed=seed,
        )
        _validate_group(defaults)
        super().__init__(params, defaults)
        self._register_state_hooks()
        self.state = _TrackedState(self.state)
        self._layouts: dict[int, _GroupLayout] = {}

    def _register_state_hooks(self) -> None:
        """Loading a state dict keeps this optimizer's momentum_dtype and converts to it."""
        if not getattr(self, "_state_hooks_registered", False):
            self.register_load_state_dict_pre_hook(_check_momentum_shapes)
            self.register_load_state_dict_pre_hook(sharded.requantize_loaded)
            self.register_load_state_dict_pre_hook(remember_loaded_state)
            self.register_state_dict_post_hook(sharded.present_state)
            self.register_load_state_dict_post_hook(convert_loaded_state)
            self._state_hooks_registered = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "momentum_dtype" in param_group:
            param_group["momentum_dtype"] = normalize_momentum_dtype(param_group["momentum_dtype"])
        _validate_group({**self.defaults, **param_group})
        super().add_param_group(param_group)
        guards.remember_shapes(self)
        group = self.param_groups[-1]
        if group["decouple_lr"] and group["max_lr"] is None:
            group["max_lr"] = _as_float(group["lr"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._register_state_hooks()
        if not isinstance(self.state, _TrackedState):
            self.state = _TrackedState(self.state)
        self._layouts = {}
        for group in self.param_groups:
            for key, value in _GROUP_DEFAULTS.items():
                group.setdefault(key, value)
            if group["decouple_lr"] and group["max_lr"] is None:
                group["max_lr"] = _as_float(group["lr"])

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
    ) -> bool:
        """Collect the group's parameters that have a gradient, creating their state.

        Follows torch.optim's ``_init_group`` convention (fill lists, return whether any
        parameter is complex), which ``torch.compile`` recognises.
        """
        momentum_dtype = group["momentum_dtype"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise SparseGradientError(
                    "Lion does not support sparse gradients; use dense gradients "
                    "(e.g. nn.Embedding(sparse=False))"
                )
            state = self.state[p]
            if momentum_dtype is not None or "exp_avg" not in state or "exp_avg_scale" in state:
                if sharded.is_dtensor(p):  # FSDP2: state on the local shard
                    sharded.convert_momentum(state, p, momentum_dtype)
                else:
                    convert_momentum(state, p, momentum_dtype)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
        return any(map(torch.is_complex, params))

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for index, group in enumerate(self.param_groups):
            if group["cautious"]:  # its mask mean is per tensor: not on flat partitions
                guards.check_whole(self, index, "Cautious Lion")
        for group in self.param_groups:
            fast = self._cpu_dispatch_ready(group)
            if fast and self._step_cached_layout(group):
                continue
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            self._init_group(group, params, grads, exp_avgs)
            if fast is not None:
                self._remember_layout(group)
            if not params:
                continue
            lion(
                params,
                grads,
                exp_avgs,
                lr=group["lr"],
                **_update_rule(group),
                foreach=group["foreach"],
                fused=group["fused"],
                exp_avg_scales=self._exp_avg_scales(group, params),
                rounding_keys=self._rounding_keys(group, params),
            )
        return loss

    # The C++ dispatch of fused CPU steps. Each group's parameters and their state dicts are
    # remembered after a Python step ("layout"); later steps hand them to one C++ call that
    # reads each p.grad and state["exp_avg"] itself. A layout is dropped when the state is
    # changed (the state dict counts its changes), the group's params change, or the C++ side
    # finds it stale (a new parameter with a gradient, a momentum in another format).

    def _cpu_dispatch_ready(self, group: dict[str, Any]) -> bool | None:
        """True: step through the C++ dispatch; False: not yet (it is building); None: never."""
        if (
            torch.compiler.is_compiling()
            or group["fused"] is False
            or group["foreach"]
            or group["momentum_dtype"] not in (None, torch.float32, torch.bfloat16)
            or group["stochastic_rounding"]
            or not isinstance(self.state, _TrackedState)
        ):
            return None
        params = group["params"]
        if not params or not params[0].is_cpu or sharded.is_dtensor(params[0]):
            return None
        return cpu_dispatch.available()

    def _step_cached_layout(self, group: dict[str, Any]) -> bool:
        """Step ``group`` in one C++ call; False when the Python path must do it."""
        layout = self._layouts.get(id(group))
        if layout is None or not layout.fits(group, self.state):
            return False
        hyper = LionHyper(lr=_as_float(group["lr"]), **_update_rule(group))
        status = cpu_dispatch.group_step(
            group["params"], layout.params, layout.states, group["momentum_dtype"], hyper
        )
        if status == cpu_dispatch.STALE:
            del self._layouts[id(group)]
        # DECLINED (say, a non-contiguous grad this step): the Python path takes this step.
        return status in (cpu_dispatch.STEPPED, cpu_dispatch.NOTHING_TO_DO)

    def _remember_layout(self, group: dict[str, Any]) -> None:
        layout = self._layouts.get(id(group))
        if layout is not None and layout.fits(group, self.state) and layout.same_params(group):
            return
        state = self.state
        params = tuple(group["params"])
        self._layouts[id(group)] = _GroupLayout(
            group=group,
            params=params,
            states=tuple(map(state.get, params)),
            state=state,
            version=state.version,
        )

    def _exp_avg_scales(
        self, group: dict[str, Any], params: list[Tensor]
    ) -> list[Tensor | None] | None:
        """The 8-bit momenta's block scales; None when the group has none (no 8-bit format)."""
        if group["momentum_dtype"] is None:  # _init_group dequantised any loaded 8-bit state
            return None
        scales = [self.state[p].get("exp_avg_scale") for p in params]
        return scales if any(s is not None for s in scales) else None

    def _rounding_keys(self, group: dict[str, Any], params: list[Tensor]) -> list[int] | None:
        """This step's per-tensor stochastic-rounding keys; advances each ``state["step"]``."""
        if not group["stochastic_rounding"]:
            return None
        first = 0
        for other in self.param_groups:
            if other is group:
                break
            first += len(other["params"])
        index = {id(p): first + i for i, p in enumerate(group["params"])}
        keys = []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.int64)
            step = state["step"]
            keys.append(rounding_key(group["seed"], int(step), index[id(p)]))
            step += 1
        return keys


class _TrackedState(defaultdict):
    """``Optimizer.state`` (a ``defaultdict(dict)``) that counts the changes made to it.

    ``Lion`` compares the count to tell whether a remembered group layout is still valid.
    """

    version = 0

    def __init__(self, items: dict | None = None) -> None:
        super().__init__(dict, items or {})

    def __reduce__(self):
        return (_TrackedState, (), None, None, iter(self.items()))

    def _changed(self) -> None:
        self.version += 1

    def __setitem__(self, key, value) -> None:
        self._changed()
        super().__setitem__(key, value)

    def __delitem__(self, key) -> None:
        self._changed()
        super().__delitem__(key)

    def __ior__(self, other):
        self._changed()
        return super().__ior__(other)

    def clear(self) -> None:
        self._changed()
        super().clear()

    def pop(self, *args):
        self._changed()
        return super().pop(*args)

    def popitem(self):
        self._changed()
        return super().popitem()

    def setdefault(self, key, default=None):
        self._changed()
        return super().setdefault(key, default)

    def update(self, *args, **kwargs) -> None:
        self._changed()
        super().update(*args, **kwargs)


@dataclass(eq=False, repr=False)
class _GroupLayout:
    """A group's parameters and their state dicts, as ``Lion`` last saw them."""

    group: dict[str, Any]
    params: tuple[Tensor, ...]
    states: tuple[dict | None, ...]
    state: _TrackedState
    version: int

    def fits(self, group: dict[str, Any], state: _TrackedState) -> bool:
        """Same group and unchanged state (the C++ side checks the params one by one)."""
        return self.group is group and self.state is state and self.version == state.version

    def same_params(self, group: dict[str, Any]) -> bool:
        params = group["params"]
        return len(params) == len(self.params) and all(map(operator.is_, params, self.params))


def _update_rule(group: dict[str, Any]) -> dict[str, Any]:
    """The group's step options other than lr, as ``lion()`` and ``LionHyper`` take them.

    The weight decay is λ as the step applies it (÷ max_lr with ``decouple_lr``).
    """
    beta1, beta2 = group["betas"]
    weight_decay = group["weight_decay"]
    if group["decouple_lr"] and weight_decay != 0:
        weight_decay = weight_decay / group["max_lr"]
    return dict(
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        maximize=group["maximize"],
        cautious=group["cautious"],
        cautious_weight_decay=group["cautious_weight_decay"],
    )


def _check_momentum_shapes(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    """``load_state_dict`` pre-hook: a momentum that does not fit its parameter is an error.

    Checked before anything is loaded, so a wrong checkpoint changes nothing.
    """
    saved_state = state_dict.get("state", {})
    for group, saved_group in zip(optimizer.param_groups, state_dict.get("param_groups", [])):
        for param, key in zip(group["params"], saved_group["params"]):
            state = saved_state.get(key, {})
            momentum = state.get("exp_avg")
            if not isinstance(momentum, Tensor):
                continue
            if "exp_avg_scale" in state:  # 8-bit: flat codes padded to whole blocks
                fits = momentum.numel() == padded_numel(param.numel())
            else:
                fits = momentum.shape == param.shape
            if not fits:
                raise ValueError(
                    f"Invalid state for parameter {key}: exp_avg has shape "
                    f"{tuple(momentum.shape)}, the parameter {tuple(param.shape)}"
                )


def _as_float(value: float | Tensor) -> float:
    return value.item() if isinstance(value, Tensor) else float(value)


def _validate_group(group: dict[str, Any]) -> None:
    """Raise ValueError, in torch.optim's wording, for a hyperparameter Lion cannot use."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr = lr.item()
    if not _is_finite_at_least(_real_number("learning rate", lr), 0.0):
        raise ValueError(f"Invalid learning rate: {lr}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2)")
    for index, beta in enumerate(betas):
        if not 0.0 <= _real_number(f"beta parameter at index {index}", beta) < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
    weight_decay = group["weight_decay"]
    if not _is_finite_at_least(_real_number("weight_decay value", weight_decay), 0.0):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    max_lr = group.get("max_lr")
    if max_lr is not None:
        value = _real_number("max_lr value", max_lr)
        if not _is_finite_at_least(value, 0.0) or value == 0.0:
            raise ValueError(f"Invalid max_lr value: {max_lr}")
    normalize_momentum_dtype(group.get("momentum_dtype"))
    seed = group.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Invalid seed value: {seed!r}; expected a non-negative int")
    flags = ("maximize", "cautious", "cautious_weight_decay", "decouple_lr", "stochastic_rounding")
    for flag in flags:
        if flag in group and not isinstance(group[flag], bool):
            raise ValueError(f"Invalid {flag} value: {group[flag]!r}; expected a bool")
    for flag in ("foreach", "fused"):
        if group.get(flag) not in (None, True, False):
            raise ValueError(f"Invalid {flag} value: {group[flag]!r}; expected None or a bool")


def _is_finite_at_least(value: float, low: float) -> bool:
    return math.isfinite(value) and value >= low


def _real_number(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: {value!r}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: {value!r}")
    return float(value)
