"""``LionFamily``: what Lion, Signum and Tiger share as ``torch.optim.Optimizer`` subclasses.

The base owns:

- validation: ``validate_group`` (torch.optim's wording), run on the defaults and on every
  added group; the checks shared by the family are the helpers below;
- defaults: ``GROUP_DEFAULTS`` are back-filled by ``__setstate__`` into groups saved by older
  versions;
- state init through the group's momentum format (``lionopt.state.formats``): ``_init_group``;
- ``load_state_dict``: ``validate_state_dict`` is the one place a checkpoint is checked before
  anything is loaded (the momentum fit check, ``lionopt.state.checkpoint``); the format
  conversion hooks are registered here too;
- the step: ``step`` calls ``_step_group(group, params=None)`` for each group, the one place
  where a group (or, with ``params``, some of its parameters) is stepped; a subclass defines it;
- gradient release (``step_in_backward=True``, ``lionopt.optim.release``): hooks step each
  parameter through ``_step_group(group, [p])`` during backward, and ``step()`` then advances
  the counters (``_released_group``);
- duplicate parameters in one group are a ValueError (they would move twice per step).

The update rule itself is ``lionopt.kernels.reference`` (``lionopt.functional.lion`` dispatches to
it and to the faster bodies that are bitwise equal to it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from lionopt.kernels.cpu.dispatch import GroupStepCache
from lionopt.kernels.hyper import LionHyper
from lionopt.kernels.rounding import rounding_key
from lionopt.optim import guards
from lionopt.optim.release import GradientRelease
from lionopt.state import checkpoint, dtensor, foreign
from lionopt.state.formats import normalize_momentum_dtype, resolve_format

__all__ = ["LionFamily", "ParamsT", "SparseGradientError", "as_float"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]


class SparseGradientError(RuntimeError, ValueError):
    """Lion got a sparse gradient, which it does not support."""


class LionFamily(Optimizer):
    """The shared base (see the module docstring). Subclasses set ``GROUP_DEFAULTS``, define
    ``validate_group`` and ``_step_group``."""

    #: Group keys added after the first release, back-filled into older saved groups.
    GROUP_DEFAULTS: ClassVar[dict[str, Any]] = {}
    #: Skip parameters with no elements (nothing to update).
    SKIP_EMPTY = False

    def __init__(
        self, params: ParamsT, defaults: dict[str, Any], *, step_in_backward: bool = False
    ) -> None:
        if "momentum_dtype" in defaults:
            defaults["momentum_dtype"] = normalize_momentum_dtype(defaults["momentum_dtype"])
        self.validate_group(defaults)
        if not isinstance(step_in_backward, bool):
            raise ValueError(
                f"Invalid step_in_backward value: {step_in_backward!r}; expected a bool"
            )
        self._release = GradientRelease(self) if step_in_backward else None
        try:
            super().__init__(params, defaults)
        except BaseException:
            if self._release is not None:
                self._release.remove()
            raise
        self._register_state_hooks()
        self._cache = GroupStepCache()
        self.state = self._cache.track(self.state)

    # -- groups -------------------------------------------------------------------------------

    @classmethod
    def validate_group(cls, group: dict[str, Any]) -> None:
        """Raise ValueError, in torch.optim's wording, for a hyperparameter the optimizer cannot use."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "momentum_dtype" in param_group:
            param_group["momentum_dtype"] = normalize_momentum_dtype(param_group["momentum_dtype"])
        self.validate_group({**self.defaults, **param_group})
        params = param_group.get("params")
        if isinstance(params, Tensor):
            params = [params]
        elif params is not None and not isinstance(params, set):  # torch's TypeError for a set
            params = list(params)
            _check_no_duplicates(params)
        if params is not None:
            param_group["params"] = params
        release = getattr(self, "_release", None)
        if release is not None and params is not None:
            release.check(params)
        super().add_param_group(param_group)
        guards.remember_shapes(self)
        self._group_added(self.param_groups[-1])
        if release is not None:
            release.add(self.param_groups[-1])

    # -- gradient release (``step_in_backward=True``, ``lionopt.optim.release``) ---------------

    @property
    def step_in_backward(self) -> bool:
        """Whether each parameter is stepped in the backward pass (gradient release)."""
        return getattr(self, "_release", None) is not None

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # GradScaler then passes itself to step(), which refuses it under gradient release.
        return self.step_in_backward

    def accumulate_grads(self):
        """Context manager: backward passes inside it keep their gradients (micro-batches);
        the next backward outside it steps on the accumulated gradients. Only with
        ``step_in_backward=True``."""
        if not self.step_in_backward:
            raise ValueError("accumulate_grads() is for step_in_backward=True optimizers")
        return self._release.accumulate()

    def remove_step_in_backward_hooks(self) -> None:
        """Turn gradient release off: remove the hooks; ``step()`` steps as usual again."""
        if getattr(self, "_release", None) is not None:
            self._release.remove()
            self._release = None

    def _released_group(self, group: dict[str, Any]) -> None:
        """``step()`` under gradient release: advance the group's counters (none for Lion)."""

    def _group_added(self, group: dict[str, Any]) -> None:
        """Fill derived group values (called for new groups and for loaded ones)."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._register_state_hooks()
        self._cache = GroupStepCache()
        self.state = self._cache.track(self.state)
        for group in self.param_groups:
            for key, value in self.GROUP_DEFAULTS.items():
                group.setdefault(key, value)
            self._group_added(group)

    # -- state dicts --------------------------------------------------------------------------

    def _register_state_hooks(self) -> None:
        """Loading a state dict keeps this optimizer's momentum formats and converts to them."""
        if not getattr(self, "_state_hooks_registered", False):
            self.register_load_state_dict_pre_hook(_validate_state_dict_hook)
            # FSDP2 8-bit momenta: fp32 DTensors in state dicts, re-quantised on load.
            self.register_load_state_dict_pre_hook(checkpoint.requantize_sharded)
            self.register_load_state_dict_pre_hook(checkpoint.remember_loaded_state)
            self.register_load_state_dict_post_hook(checkpoint.convert_loaded_state)
            self.register_state_dict_post_hook(dtensor.present_state)
            self._state_hooks_registered = True

    def validate_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise ValueError for a state dict this optimizer cannot load; runs before anything is
        loaded, so a rejected checkpoint changes nothing. Extend it with ``super()`` calls."""
        foreign.check_not_foreign(self, state_dict)
        checkpoint.check_momentum_shapes(self, state_dict)

    # -- state --------------------------------------------------------------------------------

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        scales: list[Tensor | None] | None = None,
        *,
        only: Iterable[Tensor] | None = None,
    ) -> bool:
        """Collect the group's parameters that have a gradient, creating their state.

        Follows torch.optim's ``_init_group`` convention (fill lists, return whether any
        parameter is complex), which ``torch.compile`` recognises. The momentum is created or
        converted by the group's format; ``scales`` gets each 8-bit momentum's block scales
        (None for a plain one). ``only``: collect just these parameters of the group.
        """
        fmt = resolve_format(group.get("momentum_dtype"))
        skip_empty = self.SKIP_EMPTY
        for p in group["params"] if only is None else only:
            if p.grad is None or (skip_empty and p.numel() == 0):
                continue
            if p.grad.is_sparse:
                raise SparseGradientError(
                    f"{type(self).__name__} does not support sparse gradients; use dense "
                    "gradients (e.g. nn.Embedding(sparse=False))"
                )
            momentum, scale = fmt.prepare(self.state[p], p)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(momentum)
            if scales is not None:
                scales.append(scale)
        return any(map(torch.is_complex, params))

    def _rounding_keys(self, group: dict[str, Any], params: list[Tensor]) -> list[int] | None:
        """This step's per-tensor stochastic-rounding keys; advances each ``state["step"]``."""
        if not group.get("stochastic_rounding"):
            return None
        if any(p.dtype == torch.float16 for p in params):  # before any counter moves
            raise ValueError(
                "stochastic rounding is implemented for bfloat16 parameters, not float16"
            )
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

    # -- the step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None, grad_scaler=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.

        With ``step_in_backward=True`` the parameters were stepped during backward: this only
        steps those that still hold a gradient and advances the counters.
        """
        if getattr(self, "_release", None) is not None:
            self._step_released(closure, grad_scaler)
            return None
        if grad_scaler is not None:
            raise ValueError("grad_scaler is only passed by GradScaler under step_in_backward")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            rule = self._whole_tensor_rule(group)
            if rule is not None:  # per-tensor statistics: not on flat partitions (DeepSpeed)
                guards.check_whole(self, index, rule)
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _whole_tensor_rule(self, group: dict[str, Any]) -> str | None:
        """The name of the rule when ``group``'s step takes statistics per tensor, else None."""
        return None

    def _step_group(self, group: dict[str, Any], params: list[Tensor] | None = None) -> None:
        """Step ``group`` (or only ``params``, parameters of it): the one place a step happens."""
        raise NotImplementedError

    def _step_released(self, closure, grad_scaler) -> None:
        if closure is not None:
            raise ValueError(
                "step_in_backward=True steps during backward, so step() cannot take a closure "
                "(its backward would already have stepped); call backward yourself"
            )
        if grad_scaler is not None:
            raise ValueError(
                "step_in_backward=True cannot be used with GradScaler: each parameter is "
                "stepped during backward with its scaled gradient, before anything can unscale "
                "it. Use bf16 autocast without a scaler, or step_in_backward=False"
            )
        for group in self.param_groups:
            pending = [p for p in group["params"] if p.grad is not None]
            if pending:
                self._step_group(group, pending)
                for p in pending:
                    p.grad = None
            self._released_group(group)


def _check_no_duplicates(params: list[Any]) -> None:
    seen: set[int] = set()
    for i, p in enumerate(params):
        if id(p) in seen:
            raise ValueError(
                f"parameter {i} appears twice in one parameter group; each parameter may be "
                "listed once (it would be stepped twice per step)"
            )
        seen.add(id(p))


def _validate_state_dict_hook(optimizer: LionFamily, state_dict: dict[str, Any]) -> None:
    optimizer.validate_state_dict(state_dict)


def lion_hyper(group: dict[str, Any], lr: float | None = None) -> LionHyper:
    """The step's ``LionHyper`` from a Lion group (lr as a float unless ``lr`` is given)."""
    return LionHyper(lr=as_float(group["lr"]) if lr is None else lr, **update_rule(group))


def update_rule(group: dict[str, Any]) -> dict[str, Any]:
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


def as_float(value: float | Tensor) -> float:
    return value.item() if isinstance(value, Tensor) else float(value)


def check_lr(lr: Any) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr = lr.item()
    if not is_finite_at_least(real_number("learning rate", lr), 0.0):
        raise ValueError(f"Invalid learning rate: {lr}")


def check_weight_decay(weight_decay: Any) -> None:
    if not is_finite_at_least(real_number("weight_decay value", weight_decay), 0.0):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def check_impl_flags(group: dict[str, Any]) -> None:
    for flag in ("foreach", "fused"):
        if group.get(flag) not in (None, True, False):
            raise ValueError(f"Invalid {flag} value: {group[flag]!r}; expected None or a bool")
    if group.get("foreach") and group.get("fused"):
        raise ValueError("`fused` and `foreach` cannot be `True` together.")


def check_bools(group: dict[str, Any], flags: Iterable[str]) -> None:
    for flag in flags:
        if flag in group and not isinstance(group[flag], bool):
            raise ValueError(f"Invalid {flag} value: {group[flag]!r}; expected a bool")


def check_memory_options(group: dict[str, Any]) -> None:
    """``momentum_dtype``, ``stochastic_rounding`` and ``seed``."""
    normalize_momentum_dtype(group.get("momentum_dtype"))
    seed = group.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Invalid seed value: {seed!r}; expected a non-negative int")
    check_bools(group, ("stochastic_rounding",))


def is_finite_at_least(value: float, low: float) -> bool:
    return math.isfinite(value) and value >= low


def real_number(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: {value!r}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: {value!r}")
    return float(value)
