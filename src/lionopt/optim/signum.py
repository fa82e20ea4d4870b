"""``lionopt.Signum``: sign momentum (Bernstein et al. 2018), the β1 = β2 special case of Lion."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lionopt.optim.base import ParamsT
from lionopt.optim.lion import Lion

__all__ = ["Signum"]


class Signum(Lion):
    r"""Signum: signSGD with momentum (Bernstein et al. 2018, arXiv 1802.04434).

    For each parameter θ with gradient g and momentum m (``state["exp_avg"]``)::

        m ← β·m + (1 − β)·g
        θ ← θ·(1 − lr·λ) − lr·sign(m)

    This is exactly ``Lion(betas=(β, β))``: with β1 = β2, Lion's direction β·m + (1 − β)·g is
    the new momentum. Signum is a thin subclass that sets the betas, so every Lion feature
    (foreach/fused paths, ``maximize``, ``cautious``, ``decouple_lr``, ...) is available as a
    keyword, and its state dicts are Lion's. The weight decay is decoupled and scaled by the
    lr, as in Lion (the original Signum had no decay); with λ = 0 this is the paper's Signum.
    Bernstein et al. used β = 0.9.

    Args:
        params: parameters or parameter-group dicts (a group may set ``betas=(β, β)``).
        lr: learning rate.
        beta: momentum β, in [0, 1).
        weight_decay: decoupled weight decay λ.
        **kwargs: any keyword-only argument of ``lionopt.Lion``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-4,
        beta: float = 0.9,
        weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, lr=lr, betas=(beta, beta), weight_decay=weight_decay, **kwargs)
