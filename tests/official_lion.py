"""A test fixture: the official Lion algorithm as published with the paper, rewritten by us.

It keeps the official state layout (``state["exp_avg"]``; groups with ``lr``, ``betas``,
``weight_decay`` only) and its operation order, so it stands in for checkpoints written by the
official code and by the common PyTorch ports that copy it.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class OfficialLion(Optimizer):
    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - group["lr"] * group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                momentum = state["exp_avg"]
                direction = momentum * beta1 + p.grad * (1 - beta1)
                p.add_(torch.sign(direction), alpha=-group["lr"])
                momentum.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss
