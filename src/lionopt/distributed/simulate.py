"""N virtual Distributed Lion workers in one process: what voting costs, without a cluster.

``SimulatedDistributedLion`` keeps one copy of the parameters and one momentum per virtual
worker; ``step(closure)`` calls ``closure(worker)`` once per worker (each computes the loss on
its own batch and calls ``backward()``), then applies the vote exactly as ``DistributedLion``
does on N ranks (the same rule, in the same floating-point order; the tests check both against
an independent simulation).

``lionopt.tasks.workers.train_workers`` runs it (and global Lion and AdamW) on the comparison
tasks at equal tokens; ``benchmarks/distributed_lion_quality.py`` reports the figures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["SimulatedDistributedLion"]


class SimulatedDistributedLion(Optimizer):
    """Distributed Lion's rule over ``workers`` virtual workers sharing one parameter copy.

    Args are those of ``DistributedLion`` (``lr``, ``betas``, ``weight_decay``, ``vote``),
    plus ``workers``. ``state[p]["exp_avg"]`` is a list of the workers' momenta. A parameter
    with no gradient on a worker has a zero gradient there; with no gradient on any worker it
    is skipped.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        workers: int,
        vote: str = "majority",
    ) -> None:
        from lionopt.distributed.dlion import VOTES, _validate_group

        if vote not in VOTES:
            raise ValueError(f"Invalid vote: {vote!r} (expected one of {', '.join(VOTES)})")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"Invalid workers: {workers!r} (expected an int >= 1)")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))
        for group in self.param_groups:
            _validate_group(group)
        self.workers, self.vote = workers, vote

    @torch.no_grad()
    def step(self, closure: Callable[[int], Any]) -> Tensor:
        """``closure(worker)`` computes worker ``worker``'s loss and calls ``backward()``;
        returns the workers' mean loss (a 0-dim tensor)."""
        params = [p for group in self.param_groups for p in group["params"]]
        betas = [tuple(group["betas"]) for group in self.param_groups for _ in group["params"]]
        totals: list[Tensor | None] = [None] * len(params)
        missing: list[list[int]] = [[] for _ in params]  # workers without a gradient
        losses = []
        for worker in range(self.workers):
            for p in params:
                p.grad = None
            with torch.enable_grad():
                losses.append(torch.as_tensor(closure(worker)).detach().reshape(()))
            for j, p in enumerate(params):
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = [torch.zeros_like(p) for _ in range(self.workers)]
                beta1, beta2 = betas[j]
                m = state["exp_avg"][worker]
                if p.grad is None:
                    s = torch.sign(m * beta1)
                    missing[j].append(worker)
                else:
                    g = p.grad.to(p.dtype)
                    s = torch.sign(m * beta1 + g * (1 - beta1))
                    m.mul_(beta2).add_(g, alpha=1 - beta2)
                totals[j] = s if totals[j] is None else totals[j] + s
        seen = [len(missing[j]) < self.workers for j in range(len(params))]
        for j, p in enumerate(params):
            if seen[j]:  # a zero gradient on the workers that had none
                for worker in missing[j]:
                    self.state[p]["exp_avg"][worker].mul_(betas[j][1]).add_(0.0)
        index = 0
        for group in self.param_groups:
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            for p in group["params"]:
                total = totals[index]
                if seen[index]:
                    update = torch.sign(total) if self.vote == "majority" else total / self.workers
                    if wd != 0:
                        p.mul_(1 - lr * wd)
                    p.add_(update, alpha=-lr)
                index += 1
        for p in params:
            p.grad = None
        return torch.stack(losses).mean()
