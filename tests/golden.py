"""Lion written out independently in NumPy float64: the golden model the tests check against.

Deliberately shares no code with lionopt. ``sign`` follows torch.sign, which maps NaN to 0
(NumPy's own sign would give NaN), because the specification is "as the eager reference".
"""

from __future__ import annotations

import numpy as np


def torch_sign(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, 1.0, np.where(x < 0, -1.0, 0.0))


def golden_lion_step(
    theta: np.ndarray,
    momentum: np.ndarray,
    grad: np.ndarray,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One Lion step; returns the new (theta, momentum) and leaves the inputs alone."""
    if maximize:
        grad = -grad
    with np.errstate(invalid="ignore", over="ignore"):
        direction = torch_sign(beta1 * momentum + (1.0 - beta1) * grad)
        new_theta = theta * (1.0 - lr * weight_decay) - lr * direction
        new_momentum = beta2 * momentum + (1.0 - beta2) * grad
    return new_theta, new_momentum
