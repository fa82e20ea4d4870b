"""The registry of fused backends: which compiled kernel steps a ``TensorGroup``.

A backend is a ``Backend`` record: the device type it runs on, the momentum kinds it takes
(``"plain"``, ``"int8"``), whether it rounds bf16 weights stochastically, and three functions:
``available()`` (builds or loads the kernel on first call; never at import), ``supports(group,
hyper)`` (a cheap check of dtypes, layout and options) and ``step(group, hyper)`` (one in-place
step of the whole group). The backends in ``lionopt.kernels.cpu`` and ``lionopt.kernels.triton``
call ``register`` when their package is imported (``lionopt.kernels`` imports both);
``lionopt.functional`` asks ``select`` and never names a backend module.

Order: backends are tried in registration order; the first that is available and supports the
group wins. A group that needs stochastic rounding (bf16 weights with rounding keys) is given
only to backends with ``rounding=True``; a ``secondary`` backend takes other groups only when an
earlier available backend declined them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

from lionopt.kernels.group import TensorGroup
from lionopt.kernels.hyper import LionHyper
from lionopt.state.formats import PLAIN_KIND

__all__ = ["Backend", "backends", "compiled_step", "register", "select"]


@dataclass(frozen=True)
class Backend:
    """One fused kernel for one device type (see the module docstring)."""

    name: str
    device: str
    formats: frozenset[str]
    rounding: bool
    available: Callable[[], bool]
    supports: Callable[[TensorGroup, LionHyper], bool]
    step: Callable[[TensorGroup, LionHyper], None]
    #: Tried for groups that do not need rounding only after an earlier, available backend
    #: declined them (the rounding kernels also cover a few dtype pairs the plain ones do not);
    #: so a missing compiler costs one build attempt and one warning, not two.
    secondary: bool = False
    #: Under ``torch.compile``: ``(group, hyper) -> bool``, a step the tracer can follow (a
    #: ``torch.library`` custom op), False when it cannot take the group. None: no such step.
    compiled_step: Callable[[TensorGroup, LionHyper], bool] | None = None


_BACKENDS: list[Backend] = []


def register(backend: Backend) -> Backend:
    """Add ``backend`` (a later registration with the same name replaces the earlier one)."""
    for i, other in enumerate(_BACKENDS):
        if other.name == backend.name:
            _BACKENDS[i] = backend
            return backend
    _BACKENDS.append(backend)
    return backend


def backends(device: str | None = None) -> list[Backend]:
    """The registered backends (for ``device`` only, when given), in selection order."""
    return [b for b in _BACKENDS if device is None or b.device == device]


def needs_rounding(group: TensorGroup, hyper: LionHyper) -> bool:
    """Whether the group's weights are rounded stochastically (bf16 weights, keys given)."""
    return hyper.rounding_keys is not None and group.param_dtype == torch.bfloat16


def select(group: TensorGroup, hyper: LionHyper, *, explicit: bool = False) -> Backend | None:
    """The first available backend that supports ``group``; None when none does.

    ``explicit``: the user asked for ``fused=True``; a miss then warns once.
    """
    device = group.device_type
    rounding = needs_rounding(group, hyper)
    candidates = [
        b
        for b in _BACKENDS
        if b.device == device and group.kind in b.formats and (b.rounding or not rounding)
    ]
    any_available = False
    for backend in candidates:
        if backend.secondary and not rounding and not any_available:
            continue
        if not backend.available():
            continue
        any_available = True
        if backend.supports(group, hyper):
            return backend
    if explicit:
        if not any_available:
            _warn_once(
                f"lionopt: the fused {device} kernel is not available; using the foreach path."
            )
        else:
            what = "8-bit momentum tensors" if group.kind != PLAIN_KIND else f"{device} tensors"
            _warn_once(
                f"lionopt: fused=True is not supported for these {what} "
                "(device, dtype, layout or options); using the foreach path."
            )
    return None


def compiled_step(group: TensorGroup, hyper: LionHyper) -> bool:
    """Under ``torch.compile``: step ``group`` with the first backend whose ``compiled_step``
    takes it; False when none does (the caller then uses foreach, which Inductor fuses)."""
    for backend in _BACKENDS:
        if (
            backend.compiled_step is not None
            and backend.device == group.device_type
            and group.kind in backend.formats
            and not needs_rounding(group, hyper)
            and backend.compiled_step(group, hyper)
        ):
            return True
    return False


def fused_available(device: str) -> bool:
    """Whether any plain-momentum backend runs on ``device`` here."""
    return any(
        b.available() for b in backends(device) if PLAIN_KIND in b.formats and not b.rounding
    )


@cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def warn_once(message: str) -> None:
    """One RuntimeWarning per distinct message (the functional's fallbacks use it too)."""
    _warn_once(message)
