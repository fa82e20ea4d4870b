"""``load_state_dict`` hooks for the momentum formats: the fit check and the conversion.

``torch.optim.Optimizer.load_state_dict`` replaces the groups (and so ``momentum_dtype``) by
the checkpoint's, and casts every floating-point state tensor to its parameter's dtype, which
would round 8-bit scales or an fp32 momentum of a bf16 parameter. These hooks keep the
optimizer's own formats: the pre-hooks check that every saved momentum fits its parameter
(before anything is loaded, so a wrong checkpoint changes nothing) and remember the saved
tensors; the post-hook restores them and converts each to the optimizer's format.

The checkpoint layout is the one lionopt has always written (``exp_avg``, plus
``exp_avg_scale`` for 8-bit), so older checkpoints load. The hooks need only the optimizer's
``param_groups`` (each with ``momentum_dtype``) and ``state``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lionopt.state import dtensor
from lionopt.state.formats import INT8_KIND, fits, resolve_format, stored_kind

__all__ = ["check_momentum_shapes", "convert_loaded_state", "remember_loaded_state"]


def check_momentum_shapes(optimizer: Any, state_dict: dict[str, Any]) -> None:
    """Pre-hook: a momentum that does not fit its parameter is a ValueError."""
    saved_state = state_dict.get("state", {})
    for group, saved_group in zip(optimizer.param_groups, state_dict.get("param_groups", [])):
        for param, key in zip(group["params"], saved_group["params"]):
            state = saved_state.get(key, {})
            if not fits(state, param):
                momentum: Tensor = state["exp_avg"]
                raise ValueError(
                    f"Invalid state for parameter {key}: exp_avg has shape "
                    f"{tuple(momentum.shape)}, the parameter {tuple(param.shape)}"
                )


def remember_loaded_state(optimizer: Any, state_dict: dict) -> None:
    """Pre-hook: note the configured formats and the saved momenta (see the module docstring)."""
    optimizer._loading_momentum = (
        [group.get("momentum_dtype") for group in optimizer.param_groups],
        [pid for group in state_dict["param_groups"] for pid in group["params"]],
        {pid: dict(state) for pid, state in state_dict["state"].items()},
    )


def convert_loaded_state(optimizer: Any) -> None:
    """Post-hook: restore the saved momenta and convert them to the optimizer's formats."""
    configured, saved_ids, saved = optimizer.__dict__.pop("_loading_momentum")
    for group, momentum_dtype in zip(optimizer.param_groups, configured):
        if momentum_dtype is not None or "momentum_dtype" in group:
            group["momentum_dtype"] = momentum_dtype
    params = [(p, group) for group in optimizer.param_groups for p in group["params"]]
    for pid, (param, group) in zip(saved_ids, params):
        original = saved.get(pid, {})
        if "exp_avg" not in original:
            continue
        momentum_dtype = group.get("momentum_dtype")
        if momentum_dtype is None and stored_kind(original) != INT8_KIND:
            continue  # torch's own cast to the parameter's dtype stands
        state = optimizer.state[param]
        for key in ("exp_avg", "exp_avg_scale"):
            state.pop(key, None)
            if key in original:
                state[key] = original[key].to(param.device, copy=True)
        resolve_format(momentum_dtype).prepare(state, param)


def requantize_sharded(optimizer: Any, state_dict: dict) -> None:
    """Pre-hook: fp32 DTensor momenta of FSDP2 8-bit groups are re-quantised on the local
    shards before loading (see ``lionopt.state.dtensor``)."""

    def quantizes(group: dict, param: Any) -> bool:
        return resolve_format(group.get("momentum_dtype")).kind_for(param) == INT8_KIND

    dtensor.requantize_loaded(optimizer, state_dict, quantizes)
