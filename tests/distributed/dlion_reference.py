"""An independent simulation of N Distributed Lion workers in one process (for the tests).

Written from the rule alone, one worker and one tensor at a time, with no packing, buckets or
collectives: the result the distributed run must reproduce bit for bit. The arithmetic order is
that of ``lionopt.Lion``'s reference loop (two rounded products and a rounded add for c; ATen's
add-with-alpha, which fuses, for θ and m), so that one worker is exactly Lion.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def simulate(
    params: list[Tensor],
    grads: Callable[[int, int], list[Tensor | None]],
    workers: int,
    steps: int,
    lrs: list[float],
    betas: tuple[float, float],
    weight_decays: list[float],
    vote: str,
) -> tuple[list[Tensor], list[list[Tensor]]]:
    """Parameters after ``steps`` steps and every worker's momenta.

    ``grads(step, worker)`` gives one gradient per parameter (None: no gradient on that worker,
    which counts as a zero gradient; a parameter with no gradient on every worker is skipped).
    """
    beta1, beta2 = betas
    theta = [p.clone() for p in params]
    momenta = [[torch.zeros_like(p) for p in params] for _ in range(workers)]
    for step in range(steps):
        worker_grads = [grads(step, w) for w in range(workers)]
        for j, t in enumerate(theta):
            if all(worker_grads[w][j] is None for w in range(workers)):
                continue
            total = torch.zeros_like(t)
            for w in range(workers):
                g = worker_grads[w][j]
                g = torch.zeros_like(t) if g is None else g
                m = momenta[w][j]
                total += torch.sign(m * beta1 + g * (1 - beta1))
                m.mul_(beta2).add_(g, alpha=1 - beta2)
            update = torch.sign(total) if vote == "majority" else total / workers
            if weight_decays[j] != 0:
                t.mul_(1 - lrs[j] * weight_decays[j])
            t.add_(update, alpha=-lrs[j])
    return theta, momenta
