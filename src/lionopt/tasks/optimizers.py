"""Optimizer registry for the comparisons: name -> factory ``(params, adamw_lr, adamw_wd, factor)``.

Every factory receives the task's *AdamW* hyperparameters and derives its own from them, so a
comparison never hand-tunes one optimizer: Lion and its family get ``from_adamw(lr, wd)`` with
the project's factor (``--factor`` overrides it); :func:`register_optimizer` adds more.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import lionopt
from lionopt.hparams import DEFAULT_FACTOR, from_adamw

OptimizerFactory = Callable[..., torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptimizerFactory] = {}


def register_optimizer(name: str, factory: OptimizerFactory) -> None:
    """Add ``factory(params, adamw_lr, adamw_wd, factor)`` under ``name``."""
    OPTIMIZERS[name] = factory


def make_optimizer(
    name: str, params, adamw_lr: float, adamw_wd: float, factor: float = DEFAULT_FACTOR
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` from the task's AdamW values (``factor``: the AdamW→Lion one)."""
    try:
        factory = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; available: {', '.join(OPTIMIZERS)}"
        ) from None
    return factory(params, adamw_lr, adamw_wd, factor)


def _adamw(params, lr: float, wd: float, factor: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def _lion(params, lr: float, wd: float, factor: float) -> torch.optim.Optimizer:
    return lionopt.Lion(params, **from_adamw(lr, wd, factor))


def _lion_cautious(params, lr: float, wd: float, factor: float) -> torch.optim.Optimizer:
    return lionopt.Lion(params, **from_adamw(lr, wd, factor), cautious=True)


def _lion_bf16(params, lr: float, wd: float, factor: float) -> torch.optim.Optimizer:
    return lionopt.Lion(params, **from_adamw(lr, wd, factor), momentum_dtype="bf16")


def _lion_8bit(params, lr: float, wd: float, factor: float) -> torch.optim.Optimizer:
    return lionopt.Lion(params, **from_adamw(lr, wd, factor), momentum_dtype="int8")


def _signum(params, lr: float, wd: float, factor: float) -> torch.optim.Optimizer:
    return lionopt.Signum(params, **from_adamw(lr, wd, factor))


def _tiger(params, lr: float, wd: float, factor: float) -> torch.optim.Optimizer:
    # Tiger's lr is relative (a fraction of each tensor's RMS per step), so from_adamw's lr
    # does not apply; AdamW's lr is used as that fraction (the reference default, 1e-3, is
    # AdamW's usual lr) and the decay is from_adamw's, which keeps lr_t * wd near Lion's.
    return lionopt.Tiger(params, lr=lr, weight_decay=from_adamw(lr, wd, factor)["weight_decay"])


register_optimizer("adamw", _adamw)
register_optimizer("lion", _lion)
register_optimizer("lion-cautious", _lion_cautious)
register_optimizer("lion-bf16", _lion_bf16)
register_optimizer("lion-8bit", _lion_8bit)
register_optimizer("signum", _signum)
register_optimizer("tiger", _tiger)


def optimizer_hparams(optimizer: torch.optim.Optimizer) -> dict:
    """The hyperparameters actually in use (first param group), JSON-ready."""
    group = optimizer.param_groups[0]
    out = {}
    for key in ("lr", "weight_decay", "betas", "beta", "cautious"):
        if key in group:
            value = group[key]
            value = float(value) if isinstance(value, torch.Tensor) else value
            out[key] = list(value) if isinstance(value, tuple) else value
    return out
