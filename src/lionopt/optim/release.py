"""Gradient release: ``step_in_backward=True`` steps each parameter inside the backward pass.

Lion keeps one state tensor and needs no global statistic, so a parameter can be updated as
soon as its gradient is complete, and the gradient freed at once: the gradients of the whole
model never exist together. ``GradientRelease`` registers a ``register_post_accumulate_grad_hook``
on every parameter of the optimizer; the hook steps that one parameter through the optimizer's
``_step_group(group, [p])`` (the same bodies as the ordinary step, so the result is bitwise
the same) and sets ``p.grad = None``. ``optimizer.step()`` then only advances counters
(Tiger's micro-step) and steps the parameters that still hold a gradient (one set by hand, or
accumulated under ``accumulate_grads()``).

What cannot work with it, and says so:

- a closure (``step(closure)`` would run backward, which already steps): ValueError;
- ``torch.amp.GradScaler``: the hook sees the scaled gradient before anything could unscale
  it; ``scaler.step(optimizer)`` raises ValueError (the optimizer declares
  ``_step_supports_amp_scaling`` so that GradScaler hands itself to ``step``);
- clipping by global norm: the norm needs every gradient, and they are gone by the time
  ``clip_grad_norm_`` runs (it then sees no gradients and returns 0). Clip per parameter in a
  hook of your own, or do not use gradient release.

Micro-batch accumulation: run the backward of every micro-batch but the last inside
``with optimizer.accumulate_grads():`` (the hooks keep the gradients there, which add up as
usual), and the last one outside it: its hooks step on the accumulated gradient.

A parameter must be a leaf (a ``register_post_accumulate_grad_hook`` needs one) and may belong
to only one optimizer with ``step_in_backward=True``; either is a ValueError at construction.
Parameters that do not require grad get no hook (they are stepped by ``step()`` if they ever
have a gradient).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["GradientRelease"]

# id(param) -> (weak ref to the param, weak ref to its optimizer). Kept here, not on the
# tensor, so that copying or pickling a model carries no ownership along.
_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _owner(p: Tensor) -> Any:
    entry = _OWNERS.get(id(p))
    if entry is None or entry[0]() is not p:
        return None
    return entry[1]()


def _set_owner(p: Tensor, optimizer_ref: weakref.ref) -> None:
    key = id(p)

    def forget(_ref, key=key):
        entry = _OWNERS.get(key)
        if entry is not None and entry[0] is _ref:
            del _OWNERS[key]

    _OWNERS[key] = (weakref.ref(p, forget), optimizer_ref)


class GradientRelease:
    """The hooks of one optimizer (see the module docstring)."""

    def __init__(self, optimizer: Any) -> None:
        self._optimizer = weakref.ref(optimizer)
        self._handles: list[Any] = []
        self._groups: dict[int, dict[str, Any]] = {}  # id(param) -> its group
        self._layout: tuple = ()  # the param_groups the map was built from
        self._params: list[Tensor] = []
        self.accumulating = False

    def check(self, params: list[Tensor]) -> None:
        """ValueError for a parameter that cannot be released by this optimizer."""
        optimizer = self._optimizer()
        for i, p in enumerate(params):
            if not p.is_leaf:
                raise ValueError(
                    f"step_in_backward=True needs leaf tensors; parameter {i} is not a leaf "
                    "(it was computed from other tensors), so it has no gradient hook"
                )
            other = _owner(p)
            if other is not None and other is not optimizer:
                raise ValueError(
                    f"parameter {i} already belongs to another optimizer with "
                    f"step_in_backward=True ({type(other).__name__}); each parameter can be "
                    "stepped in backward by one optimizer only"
                )

    def add(self, group: dict[str, Any]) -> None:
        """Register the hooks of a new parameter group (its params were ``check``ed)."""
        for p in group["params"]:
            if not p.requires_grad:
                continue
            _set_owner(p, self._optimizer)
            self._params.append(p)
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
        self._layout = ()  # rebuild the map at the next hook

    def remove(self) -> None:
        """Remove every hook (the optimizer then steps in ``step()`` like any other)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for p in self._params:
            entry = _OWNERS.get(id(p))
            if entry is not None and entry[0]() is p and entry[1] is self._optimizer:
                del _OWNERS[id(p)]
        self._params.clear()

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        previous, self.accumulating = self.accumulating, True
        try:
            yield
        finally:
            self.accumulating = previous

    def _hook(self, p: Tensor) -> None:
        optimizer = self._optimizer()
        if optimizer is None or self.accumulating or p.grad is None:
            return
        group = self._group_of(optimizer, p)
        if group is None:  # no longer in this optimizer
            return
        with torch.no_grad():
            optimizer._step_group(group, [p])
        p.grad = None

    def _group_of(self, optimizer: Any, p: Tensor) -> dict[str, Any] | None:
        """``p``'s group now: the map is rebuilt when the groups or their lists were replaced
        (``load_state_dict`` replaces every group dict)."""
        layout = tuple((id(g), id(g["params"]), len(g["params"])) for g in optimizer.param_groups)
        if layout != self._layout:
            self._groups = {id(q): g for g in optimizer.param_groups for q in g["params"]}
            self._layout = layout
        return self._groups.get(id(p))
